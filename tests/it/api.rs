//! The contract's behaviour and status codes over a real client: every status code the
//! contract names is produced here (or in `consistency` and `outage`).

use crate::common::*;
use lockstep::grpc::pb;
use serde_json::json;
use tonic::Code;

async fn commit(
    addr: std::net::SocketAddr,
    tok: &str,
    m: Vec<pb::Mutation>,
) -> Result<pb::AuthorizeAndCommitResponse, tonic::Status> {
    client(addr).await.authorize_and_commit(authed(tok, commit_req(m))).await.map(|r| r.into_inner())
}

fn touch() -> Vec<pb::Mutation> {
    vec![update("UpdateItem", "Item", "doc", json!({ "title": "x" }), None)]
}

/// OK: create, update, delete in one request, each seeing the one before; versions
/// count changes; determining policies are returned.
async fn mutations_apply_in_order_and_all_or_nothing(b: Backend) {
    let Some(s) = start(b).await else { return };
    let tok = token("k1", "alice");
    let owner = json!({ "__entity": { "type": "User", "id": "alice" } });
    let r = commit(
        s.addr,
        &tok,
        vec![
            create("CreateItem", "Item", "new", json!({ "owner": owner, "tags": ["a", "b"], "meta": { "k": 1 } })),
            update("UpdateItem", "Item", "new", json!({ "meta": { "k": null, "j": 2 } }), Some(1)),
            pb::Mutation {
                action: "DeleteItem".into(),
                resource: uid("Item", "new"),
                change: Some(pb::mutation::Change::Delete(pb::DeleteEntity {})),
                if_version: Some(2),
            },
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.entities.iter().map(|e| e.version).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(
        r.entities[1].attributes.as_ref().unwrap().fields["meta"],
        st(json!({"meta": {"j": 2}})).unwrap().fields["meta"]
    );
    assert!(r.determining_policies.contains(&"create-own".to_string()));
    assert!(read(s.addr, "Item", "new").await.is_none());

    // All or nothing: the second mutation is denied, so the first is not committed.
    let err = commit(
        s.addr,
        &tok,
        vec![
            update("UpdateItem", "Item", "doc", json!({ "title": "kept?" }), None),
            update("UpdateItem", "Item", "shared", json!({ "title": "no" }), None),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("mutation 1"), "{}", err.message());
    assert_eq!(read(s.addr, "Item", "doc").await.unwrap().version, 1);
    let last = audit(s.addr).await.pop().unwrap();
    assert_eq!(last.kind, pb::audit_event::Kind::Deny as i32);
    assert_eq!(last.mutations.len(), 2);
}

/// PERMISSION_DENIED for a denied write and for a missing entity alike; ABORTED on a
/// stale if_version; ALREADY_EXISTS for an allowed create of an existing entity.
async fn denied_missing_aborted_already_exists(b: Backend) {
    let Some(s) = start(b).await else { return };
    let alice = token("k1", "alice");
    let mallory = token("k1", "mallory");
    let denied = commit(s.addr, &mallory, touch()).await.unwrap_err();
    let missing =
        commit(s.addr, &alice, vec![update("UpdateItem", "Item", "nope", json!({"a": 1}), None)]).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(missing.code(), Code::PermissionDenied);
    let stale =
        commit(s.addr, &alice, vec![update("UpdateItem", "Item", "doc", json!({"a": 1}), Some(7))]).await.unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    let owner = json!({ "__entity": { "type": "User", "id": "alice" } });
    let exists =
        commit(s.addr, &alice, vec![create("CreateItem", "Item", "doc", json!({ "owner": owner }))]).await.unwrap_err();
    assert_eq!(exists.code(), Code::AlreadyExists, "{exists:?}");
    // A create that policy denies is PERMISSION_DENIED even though it exists.
    let mallory_owner = json!({ "__entity": { "type": "User", "id": "alice" } });
    let e = commit(s.addr, &mallory, vec![create("CreateItem", "Item", "doc", json!({ "owner": mallory_owner }))])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // GetEntity: denied and missing are one answer.
    let mut c = client(s.addr).await;
    let d = c
        .get_entity(authed(&mallory, pb::GetEntityRequest { uid: uid("Item", "doc"), action: "ReadItem".into() }))
        .await
        .unwrap_err();
    let m = c
        .get_entity(authed(&alice, pb::GetEntityRequest { uid: uid("Item", "zzz"), action: "ReadItem".into() }))
        .await
        .unwrap_err();
    assert_eq!((d.code(), m.code()), (Code::PermissionDenied, Code::PermissionDenied));
    assert_eq!(read(s.addr, "Item", "doc").await.unwrap().version, 1, "nothing was committed");
}

/// The owner may transfer; others may not change the owner (a property-level rule that
/// reads `context.change.changed_attributes`); the caller cannot override `change`.
async fn property_rules_see_the_change(b: Backend) {
    let Some(s) = start(b).await else { return };
    let bob = token("k1", "bob");
    let to_bob = json!({ "owner": { "__entity": { "type": "User", "id": "bob" } } });
    // bob may update Item::"shared" as a writer, but not its owner.
    let mut req = commit_req(vec![update("UpdateItem", "Item", "shared", to_bob.clone(), None)]);
    req.context = st(json!({ "change": { "kind": "create", "changed_attributes": [] } }));
    let e = client(s.addr).await.authorize_and_commit(authed(&bob, req)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    commit(s.addr, &bob, vec![update("UpdateItem", "Item", "shared", json!({ "n": 5 }), None)]).await.unwrap();
    // alice, the owner, may give Item::"doc" to bob.
    commit(s.addr, &token("k1", "alice"), vec![update("UpdateItem", "Item", "doc", to_bob, None)]).await.unwrap();
}

/// Authorize answers DENY as a value (OK), with determining policies.
async fn authorize_is_a_decision(b: Backend) {
    let Some(s) = start(b).await else { return };
    let mut c = client(s.addr).await;
    let req =
        |action: &str| pb::AuthorizeRequest { action: action.into(), resource: uid("Item", "doc"), context: None };
    let allow = c.authorize(authed(&token("k1", "alice"), req("ReadItem"))).await.unwrap().into_inner();
    assert_eq!(allow.decision, pb::Decision::Allow as i32);
    assert_eq!(allow.determining_policies, vec!["owner-manages"]);
    let deny = c.authorize(authed(&token("k1", "mallory"), req("ReadItem"))).await.unwrap().into_inner();
    assert_eq!(deny.decision, pb::Decision::Deny as i32);
    let bad = c.authorize(authed(&token("k1", "alice"), req(""))).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

/// UNAUTHENTICATED for every kind of bad token; nothing is committed.
async fn bad_tokens_are_unauthenticated(b: Backend) {
    let Some(s) = start(b).await else { return };
    let n = now();
    let claims = |extra: serde_json::Value| {
        let mut c = json!({ "sub": "alice", "iat": n, "exp": n + 600, "jti": lockstep::token::uuid_like() });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let good = sign("k1", &claims(json!({})));
    let mut tampered = good.clone();
    let parts: Vec<&str> = good.split('.').collect();
    let payload = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        serde_json::to_vec(&claims(json!({"sub": "root"}))).unwrap(),
    );
    tampered =
        format!("{}.{}.{}", parts[0], payload, parts[2]).to_string() + if tampered.is_empty() { "x" } else { "" };
    let none_header =
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, br#"{"alg":"none","kid":"k1"}"#);
    let cases: Vec<(&str, String)> = vec![
        ("expired", sign("k1", &claims(json!({ "exp": n - 3600, "iat": n - 7200 })))),
        ("not yet valid", sign("k1", &claims(json!({ "nbf": n + 3600 })))),
        ("missing exp", sign("k1", &claims(json!({ "exp": null })))),
        ("string exp", sign("k1", &claims(json!({ "exp": (n + 600).to_string() })))),
        ("string nbf", sign("k1", &claims(json!({ "nbf": "0" })))),
        ("missing sub", sign("k1", &claims(json!({ "sub": null })))),
        ("iat in the future", sign("k1", &claims(json!({ "iat": n + 3600 })))),
        ("too long-lived", sign("k1", &claims(json!({ "exp": n + 10 * 86400 })))),
        ("wrong iss", sign("k3", &claims(json!({ "iss": "https://evil.example", "aud": "lockstep-tests" })))),
        ("wrong aud", sign("k3", &claims(json!({ "iss": "https://issuer.example", "aud": "other" })))),
        ("missing iss", sign("k3", &claims(json!({ "aud": "lockstep-tests" })))),
        ("tampered payload", tampered),
        ("stripped signature", format!("{}.{}.", parts[0], parts[1])),
        ("alg none", format!("{none_header}.{}.", parts[1])),
        ("unknown kid", sign("k9", &claims(json!({})))),
        ("garbage", "not-a-jwt".into()),
        ("oversized", "a".repeat(9000)),
        ("signed with another key's secret", {
            let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
            h.kid = Some("k1".into());
            jsonwebtoken::encode(&h, &claims(json!({})), &jsonwebtoken::EncodingKey::from_secret(SECRET_K2).unwrap())
                .unwrap()
        }),
        ("HS384 under an HS256 key", {
            let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS384);
            h.kid = Some("k1".into());
            jsonwebtoken::encode(&h, &claims(json!({})), &jsonwebtoken::EncodingKey::from_secret(SECRET_K1).unwrap())
                .unwrap()
        }),
    ];
    let mut c = client(s.addr).await;
    for (name, tok) in &cases {
        let e = c.authorize_and_commit(authed(tok, commit_req(touch()))).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{name}: {e:?}");
        assert!(!e.message().contains(tok.as_str()) || tok.len() < 12, "{name}: the token is echoed");
    }
    // No metadata, or not a bearer.
    let e = c.authorize_and_commit(tonic::Request::new(commit_req(touch()))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut r = tonic::Request::new(commit_req(touch()));
    r.metadata_mut().insert("authorization", format!("Basic {good}").parse().unwrap());
    assert_eq!(c.authorize_and_commit(r).await.unwrap_err().code(), Code::Unauthenticated);
    // The good one, for contrast, and the right issuer/audience under k3.
    c.authorize_and_commit(authed(&good, commit_req(touch()))).await.unwrap();
    let k3 = sign("k3", &claims(json!({ "iss": "https://issuer.example", "aud": ["x", "lockstep-tests"] })));
    c.authorize_and_commit(authed(&k3, commit_req(touch()))).await.unwrap();
    assert_eq!(read(s.addr, "Item", "doc").await.unwrap().version, 3, "only the two good tokens committed");
}

/// Logout is always allowed and ends the token; a new token of the same subject works.
/// Revoking another token needs Lockstep::Action::"RevokeToken"; RevokeSubject ends
/// every token issued until then.
async fn revocation_by_token_and_subject(b: Backend) {
    let Some(s) = start(b).await else { return };
    let mut c = client(s.addr).await;
    let a1 = token("k1", "alice");
    let a2 = token("k1", "alice");
    c.revoke_token(authed(&a1, pb::RevokeTokenRequest::default())).await.unwrap();
    assert_eq!(
        c.authorize_and_commit(authed(&a1, commit_req(touch()))).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    c.authorize_and_commit(authed(&a2, commit_req(touch()))).await.unwrap();

    // mallory may not revoke alice's token by jti; root may.
    let jti = |t: &str| -> String {
        let p = t.split('.').nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, p).unwrap(),
        )
        .unwrap();
        v["jti"].as_str().unwrap().to_owned()
    };
    let req = pb::RevokeTokenRequest { jti: jti(&a2), expires_at: None };
    assert_eq!(
        c.revoke_token(authed(&token("k1", "mallory"), req.clone())).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    c.authorize_and_commit(authed(&a2, commit_req(touch()))).await.unwrap();
    c.revoke_token(authed(&token("k2", "root"), req)).await.unwrap();
    assert_eq!(
        c.authorize_and_commit(authed(&a2, commit_req(touch()))).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // RevokeSubject of someone else needs permission; of oneself is always allowed.
    let other = pb::RevokeSubjectRequest { subject: uid("User", "alice") };
    assert_eq!(
        c.revoke_subject(authed(&token("k1", "mallory"), other)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let m = token("k1", "mallory");
    c.revoke_subject(authed(&m, pb::RevokeSubjectRequest::default())).await.unwrap();
    assert_eq!(
        c.authorize(authed(
            &m,
            pb::AuthorizeRequest { action: "ReadItem".into(), resource: uid("Item", "doc"), context: None }
        ))
        .await
        .unwrap_err()
        .code(),
        Code::Unauthenticated
    );
    let kinds: Vec<i32> = audit(s.addr).await.iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&(pb::audit_event::Kind::RevokeToken as i32)));
    assert!(kinds.contains(&(pb::audit_event::Kind::RevokeSubject as i32)));
}

/// INVALID_ARGUMENT for malformed and oversized requests; nothing changes.
async fn malformed_requests_are_invalid_argument(b: Backend) {
    let Some(s) = start(b).await else { return };
    let tok = token("k1", "alice");
    let mut c = client(s.addr).await;
    let mut deep = json!(1);
    for _ in 0..20 {
        deep = json!({ "d": deep });
    }
    let cases: Vec<(&str, pb::AuthorizeAndCommitRequest)> = vec![
        ("no mutations", commit_req(vec![])),
        ("fraction", commit_req(vec![update("UpdateItem", "Item", "doc", json!({ "x": 1.5 }), None)])),
        ("null in create", commit_req(vec![create("CreateItem", "Item", "z", json!({ "x": null }))])),
        ("too deep", commit_req(vec![update("UpdateItem", "Item", "doc", json!({ "x": deep }), None)])),
        (
            "no change",
            commit_req(vec![pb::Mutation {
                action: "UpdateItem".into(),
                resource: uid("Item", "doc"),
                change: None,
                if_version: None,
            }]),
        ),
        (
            "no resource",
            commit_req(vec![pb::Mutation {
                action: "UpdateItem".into(),
                resource: None,
                change: Some(pb::mutation::Change::Delete(pb::DeleteEntity {})),
                if_version: None,
            }]),
        ),
        ("bad type", commit_req(vec![update("UpdateItem", "Not A Type", "doc", json!({}), None)])),
        ("bad action", commit_req(vec![update("User::\"x\"", "Item", "doc", json!({}), None)])),
        (
            "too many mutations",
            commit_req((0..101).map(|_| update("UpdateItem", "Item", "doc", json!({}), None)).collect()),
        ),
        (
            "huge attribute",
            commit_req(vec![update("UpdateItem", "Item", "doc", json!({ "x": "a".repeat(70_000) }), None)]),
        ),
        (
            "oversized request",
            commit_req(
                (0..60)
                    .map(|i| update("UpdateItem", "Item", "doc", json!({ "x": "a".repeat(20_000 + i) }), None))
                    .collect(),
            ),
        ),
        (
            "bad entity ref",
            commit_req(vec![update(
                "UpdateItem",
                "Item",
                "doc",
                json!({ "x": { "__entity": { "type": "no such type!", "id": "1" } } }),
                None,
            )]),
        ),
    ];
    for (name, req) in cases {
        let e = c.authorize_and_commit(authed(&tok, req)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
    }
    assert_eq!(read(s.addr, "Item", "doc").await.unwrap().version, 1);
}

/// The control plane: PutPolicies validates (INVALID_ARGUMENT keeps the active set),
/// keys are managed under ManageKeys, never show secrets, and kids are not reused.
async fn admin_policies_and_keys(b: Backend) {
    let Some(s) = start(b).await else { return };
    let mut a = admin(s.addr).await;
    let root = token("k2", "root");
    let bad = a
        .put_policies(authed(
            &root,
            pb::PutPoliciesRequest {
                policies: "permit(principal, action, resource".into(),
                schema: String::new(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("1:"), "messages carry line:column: {}", bad.message());
    let schema = "entity User; entity Item; action UpdateItem appliesTo { principal: User, resource: Item };";
    let invalid = a
        .put_policies(authed(
            &root,
            pb::PutPoliciesRequest {
                policies: "permit(principal, action == Action::\"Nope\", resource);".into(),
                schema: schema.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
    let got = a.get_policies(authed(&root, pb::GetPoliciesRequest {})).await.unwrap().into_inner();
    assert_eq!((got.version, got.policies.as_str()), (1, POLICIES), "the active set is unchanged");
    let denied = a
        .put_policies(authed(
            &token("k1", "alice"),
            pb::PutPoliciesRequest {
                policies: "permit(principal, action, resource);".into(),
                schema: String::new(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    let add = |kid: &str, secret: &[u8]| pb::AddKeyRequest {
        kid: kid.into(),
        algorithm: "HS256".into(),
        secret: secret.to_vec(),
        ..Default::default()
    };
    assert_eq!(a.add_key(authed(&root, add("short", b"too-short"))).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(
        a.add_key(authed(&root, pb::AddKeyRequest { algorithm: "none".into(), ..add("n", &[7; 32]) }))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    a.add_key(authed(&root, add("k4", &[7; 32]))).await.unwrap();
    assert_eq!(a.add_key(authed(&root, add("k4", &[8; 32]))).await.unwrap_err().code(), Code::AlreadyExists);
    assert_eq!(
        a.add_key(authed(&token("k1", "alice"), add("k5", &[8; 32]))).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        a.revoke_key(authed(&root, pb::RevokeKeyRequest { kid: "nope".into() })).await.unwrap_err().code(),
        Code::NotFound
    );
    let keys = a.list_keys(authed(&root, pb::ListKeysRequest {})).await.unwrap().into_inner().keys;
    assert_eq!(keys.iter().map(|k| k.kid.as_str()).collect::<Vec<_>>(), vec!["k1", "k2", "k3", "k4"]);
    assert!(keys.iter().all(|k| k.principal_type == "User" && !k.revoked));
    // ReadAudit is a Cedar action too.
    let e = client(s.addr)
        .await
        .list_audit_events(authed(&token("k1", "alice"), pb::ListAuditEventsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let seqs: Vec<u64> = audit(s.addr).await.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
}

crate::on_all_backends!(
    mutations_apply_in_order_and_all_or_nothing,
    denied_missing_aborted_already_exists,
    property_rules_see_the_change,
    authorize_is_a_decision,
    bad_tokens_are_unauthenticated,
    revocation_by_token_and_subject,
    malformed_requests_are_invalid_argument,
    admin_policies_and_keys
);

/// Server reflection answers in both versions (grpcurl 1.8.6 speaks only v1alpha), and
/// lists the contract's services; health is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_and_v1alpha_and_health() {
    use tonic_reflection::pb::{v1, v1alpha};
    let Some(s) = start(Backend::Sqlite).await else { return };
    let ch = channel(s.addr).await;
    let mut c1 = v1::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut stream = c1.server_reflection_info(futures::stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) = resp.message_response else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"lockstep.v1.Lockstep".to_string()) && names.contains(&"lockstep.v1.Admin".to_string()),
        "{names:?}"
    );

    let mut c0 = v1alpha::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut stream = c0.server_reflection_info(futures::stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) = resp.message_response
    else {
        panic!("{resp:?}")
    };
    assert!(l.service.iter().any(|s| s.name == "lockstep.v1.Lockstep"));

    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    for svc in ["", "lockstep.v1.Lockstep"] {
        let r = h.check(tonic_health::pb::HealthCheckRequest { service: svc.into() }).await.unwrap().into_inner();
        assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    }
}

/// Denials explained: off by default (PERMISSION_DENIED names the mutation only); with
/// the server configured to reveal them, a google.rpc.ErrorInfo carries the index of the
/// denied mutation and the determining policy ids. Denied and missing stay alike.
async fn denials_explained_when_configured(b: Backend) {
    use tonic_types::StatusExt;
    let Some(s) = start(b).await else { return };
    let settings = lockstep::config::Settings { reveal_determining_policies: true, ..Default::default() };
    let revealing = serve_with_settings(&s.url, Default::default(), s.db.clone(), vec![], settings).await;
    let bob = token("k1", "bob");
    let to_bob = json!({ "owner": { "__entity": { "type": "User", "id": "bob" } } });
    let req = || {
        commit_req(vec![
            update("UpdateItem", "Item", "shared", json!({ "n": 1 }), None),
            update("UpdateItem", "Item", "shared", to_bob.clone(), None),
        ])
    };

    let plain = client(s.addr).await.authorize_and_commit(authed(&bob, req())).await.unwrap_err();
    assert_eq!(plain.code(), Code::PermissionDenied);
    assert!(plain.get_details_error_info().is_none(), "policies revealed by default");

    let e = client(revealing.addr).await.authorize_and_commit(authed(&bob, req())).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("mutation 1"), "{}", e.message());
    let info = e.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "POLICY_DENIED");
    assert_eq!(info.metadata.get("mutation").map(String::as_str), Some("1"));
    assert_eq!(info.metadata.get("determining_policies").map(String::as_str), Some("owner-immutable"));
    // A missing entity: the same shape, no policies.
    let m = client(revealing.addr)
        .await
        .authorize_and_commit(authed(&bob, commit_req(vec![update("UpdateItem", "Item", "ghost", json!({}), None)])))
        .await
        .unwrap_err();
    assert_eq!(m.code(), Code::PermissionDenied);
    assert_eq!(m.get_details_error_info().unwrap().metadata.get("determining_policies").map(String::as_str), Some(""));
}

crate::on_all_backends!(denials_explained_when_configured);

/// A token seen before is not verified again (the verification cache), but its times
/// are checked on every call: it stops working when it expires; a token with the same
/// header and claims and another signature never rides on the cached one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_verification_still_expires() {
    let s = start(Backend::Sqlite).await.unwrap();
    let settings = lockstep::config::Settings { leeway_secs: 0, ..Default::default() };
    let strict = serve_with_settings(&s.url, Default::default(), s.db.clone(), vec![], settings).await;
    let n = now();
    let tok = sign("k1", &json!({ "sub": "alice", "iat": n, "exp": n + 2, "jti": "short-lived" }));
    let mut c = client(strict.addr).await;
    let ask = |t: &str| {
        authed(t, pb::AuthorizeRequest { action: "ReadItem".into(), resource: uid("Item", "doc"), context: None })
    };
    for _ in 0..3 {
        assert_eq!(c.authorize(ask(&tok)).await.unwrap().into_inner().decision, pb::Decision::Allow as i32);
    }
    let parts: Vec<&str> = tok.split('.').collect();
    let forged = format!("{}.{}.{}", parts[0], parts[1], "A".repeat(parts[2].len()));
    assert_eq!(c.authorize(ask(&forged)).await.unwrap_err().code(), Code::Unauthenticated);
    while now() <= n + 2 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let e = c.authorize(ask(&tok)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired"), "{e:?}");
}

/// Template-linked policies: the owner shares an item with one user by linking a
/// template; others may not link it; bad links are refused; a set that drops a linked
/// template is refused; unlinking ends the sharing.
async fn template_links_share_one_resource(b: Backend) {
    let Some(s) = start(b).await else { return };
    let root = token("k2", "root");
    let policies = format!(
        "{POLICIES}\n@id(\"share-read\") permit (principal == ?principal, action == Action::\"ReadItem\", resource == ?resource);\n\
         @id(\"owners-share\") permit (principal, action == Lockstep::Action::\"LinkTemplate\", resource is Item) when {{ resource has owner && resource.owner == principal }};"
    );
    let mut a = admin(s.addr).await;
    a.put_policies(authed(
        &root,
        pb::PutPoliciesRequest { policies: policies.clone(), schema: SCHEMA.into(), ..Default::default() },
    ))
    .await
    .unwrap();
    let read_as = |who: &str| {
        let t = token("k1", who);
        let addr = s.addr;
        async move {
            client(addr)
                .await
                .get_entity(authed(&t, pb::GetEntityRequest { uid: uid("Item", "doc"), action: "ReadItem".into() }))
                .await
                .map(|_| ())
                .map_err(|e| e.code())
        }
    };
    assert_eq!(read_as("mallory").await, Err(Code::PermissionDenied));
    let link = |id: &str, template: &str, who: &str| pb::LinkTemplateRequest {
        link: Some(pb::TemplateLink {
            link_id: id.into(),
            template_id: template.into(),
            principal: uid("User", who),
            resource: uid("Item", "doc"),
        }),
    };
    // mallory may not share alice's item with herself.
    assert_eq!(
        a.link_template(authed(&token("k1", "mallory"), link("l1", "share-read", "mallory"))).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // alice, the owner, may.
    a.link_template(authed(&token("k1", "alice"), link("l1", "share-read", "mallory"))).await.unwrap();
    assert_eq!(read_as("mallory").await, Ok(()));
    let d = client(s.addr)
        .await
        .authorize(authed(
            &token("k1", "mallory"),
            pb::AuthorizeRequest { action: "ReadItem".into(), resource: uid("Item", "doc"), context: None },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.determining_policies, vec!["l1"]);
    assert_eq!(read_as("bob").await, Err(Code::PermissionDenied), "only mallory was granted");
    assert_eq!(
        a.link_template(authed(&root, link("l1", "share-read", "bob"))).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    assert_eq!(
        a.link_template(authed(&root, link("l2", "no-such-template", "bob"))).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        a.link_template(authed(&root, link("owner-manages", "share-read", "bob"))).await.unwrap_err().code(),
        Code::InvalidArgument,
        "a link may not take a policy's id"
    );
    let links = a.list_template_links(authed(&root, pb::ListTemplateLinksRequest {})).await.unwrap().into_inner().links;
    assert_eq!(links.len(), 1);
    // A policy set without the linked template is refused while the link exists.
    let e = a
        .put_policies(authed(
            &root,
            pb::PutPoliciesRequest { policies: POLICIES.into(), schema: SCHEMA.into(), ..Default::default() },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Unlink ends it.
    assert_eq!(
        a.unlink_template(authed(&root, pb::UnlinkTemplateRequest { link_id: "nope".into() }))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    a.unlink_template(authed(&token("k1", "alice"), pb::UnlinkTemplateRequest { link_id: "l1".into() })).await.unwrap();
    assert_eq!(read_as("mallory").await, Err(Code::PermissionDenied));
    a.put_policies(authed(
        &root,
        pb::PutPoliciesRequest { policies: POLICIES.into(), schema: SCHEMA.into(), ..Default::default() },
    ))
    .await
    .unwrap();
}

crate::on_all_backends!(template_links_share_one_resource);

/// Messages name the real problem: an unknown algorithm in AddKey (before anything about
/// its key material), an `exp` of the wrong kind, a `sub` over the limit; a message over
/// gRPC's 4 MiB is RESOURCE_EXHAUSTED and one nested past prost's recursion limit is
/// INVALID_ARGUMENT (tonic itself says OUT_OF_RANGE and INTERNAL).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_name_the_real_problem() {
    let Some(s) = start(Backend::Sqlite).await else { return };
    let root = token("k2", "root");
    let mut a = admin(s.addr).await;
    for alg in ["none", "hs256", "foo"] {
        let e = a
            .add_key(authed(
                &root,
                pb::AddKeyRequest { kid: "n".into(), algorithm: alg.into(), secret: vec![7; 32], ..Default::default() },
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(&format!("unknown algorithm `{alg}`")), "{alg}: {e:?}");
        assert!(
            e.message().contains("HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"),
            "{alg}: {e:?}"
        );
    }

    let mut c = client(s.addr).await;
    let n = now();
    let claims =
        |exp: serde_json::Value| json!({ "sub": "alice", "iat": n, "exp": exp, "jti": lockstep::token::uuid_like() });
    for (exp, what) in
        [(json!(-1), "negative"), (json!(1e300), "out of range"), (json!(true), "a boolean"), (json!(null), "null")]
    {
        let e =
            c.authorize_and_commit(authed(&sign("k1", &claims(exp.clone())), commit_req(touch()))).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("token `exp` must be a number of seconds"), "exp {exp}: {e:?}");
        assert!(e.message().contains(what), "exp {exp}: {e:?}");
    }
    let long = sign("k1", &json!({ "sub": "a".repeat(2048), "iat": n, "exp": n + 600 }));
    let e = c.authorize_and_commit(authed(&long, commit_req(touch()))).await.unwrap_err();
    assert!(e.message().contains("token `sub` is 2048 bytes; at most 1024"), "{e:?}");

    // A context nested 150 deep (prost stops at 100): INVALID_ARGUMENT.
    let mut v = prost_types::Value { kind: Some(prost_types::value::Kind::BoolValue(true)) };
    for _ in 0..150 {
        let st = prost_types::Struct { fields: [("a".to_string(), v)].into_iter().collect() };
        v = prost_types::Value { kind: Some(prost_types::value::Kind::StructValue(st)) };
    }
    let Some(prost_types::value::Kind::StructValue(deep)) = v.kind else { unreachable!() };
    let mut req = commit_req(touch());
    req.context = Some(deep);
    let e = c.authorize_and_commit(authed(&token("k1", "alice"), req)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("cannot be decoded"), "{e:?}");
    // Over gRPC's own 4 MiB: RESOURCE_EXHAUSTED.
    let mut big = commit_req(touch());
    big.idempotency_key = "k".repeat(5 * 1024 * 1024);
    let e = c.authorize_and_commit(authed(&token("k1", "alice"), big)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());

    // The server is fine afterwards.
    c.authorize_and_commit(authed(&token("k1", "alice"), commit_req(touch()))).await.unwrap();
}
