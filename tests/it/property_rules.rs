//! The property-rules example (examples/property-rules) enforced by a real server:
//! the owner is immutable except for admins, status moves draft -> review -> published
//! by the right role, and only a token with a scope may change `featured`.

use crate::common::*;
use lockstep::engine::{CallOptions, Caller};
use lockstep::grpc::pb;
use serde_json::json;
use tonic::Code;

async fn property_rules_enforced(b: Backend) {
    let Some(db) = TestDb::new(b).await else { return };
    let root = env!("CARGO_MANIFEST_DIR");
    {
        let engine = operator_with_k1(&db.url).await;
        let policies = std::fs::read_to_string(format!("{root}/examples/property-rules/policies.cedar")).unwrap();
        let schema = std::fs::read_to_string(format!("{root}/examples/property-rules/schema.cedarschema")).unwrap();
        engine.put_policies(Caller::Operator, &policies, &schema, false, CallOptions::default()).await.unwrap();
        let entities = std::fs::read_to_string(format!("{root}/examples/property-rules/entities.json")).unwrap();
        engine.import_entities(lockstep::cli::parse_entities(&entities).unwrap()).await.unwrap();
    }
    let s = serve(std::sync::Arc::new(db), Default::default()).await;
    let tok = |sub: &str, scope: &str| {
        let n = now();
        sign(
            "k1",
            &json!({ "sub": sub, "iat": n, "exp": n + 600, "scope": scope, "jti": lockstep::token::uuid_like() }),
        )
    };
    let c = client(s.addr).await;
    let put = |who: String, art: &'static str, patch: serde_json::Value| {
        let mut c = c.clone();
        let req = commit_req(vec![update("UpdateArticle", "Article", art, patch, None)]);
        async move { c.authorize_and_commit(authed(&who, req)).await.map(|_| ()).map_err(|e| e.code()) }
    };
    let user = |id: &str| json!({ "__entity": { "type": "User", "id": id } });
    // Status workflow.
    assert_eq!(
        put(tok("ed", ""), "a1", json!({ "status": "published" })).await,
        Err(Code::PermissionDenied),
        "editor skipped review"
    );
    assert_eq!(
        put(tok("ann", ""), "a2", json!({ "status": "published" })).await,
        Err(Code::PermissionDenied),
        "owner published"
    );
    assert_eq!(put(tok("ann", ""), "a1", json!({ "status": "review" })).await, Ok(()));
    assert_eq!(put(tok("ed", ""), "a1", json!({ "status": "published" })).await, Ok(()));
    // Owner immutable except for admins.
    assert_eq!(put(tok("ann", ""), "a2", json!({ "owner": user("eve") })).await, Err(Code::PermissionDenied));
    assert_eq!(put(tok("root", ""), "a2", json!({ "owner": user("eve") })).await, Ok(()));
    // A field only a scope may change.
    assert_eq!(put(tok("ed", ""), "a1", json!({ "featured": true })).await, Err(Code::PermissionDenied));
    assert_eq!(put(tok("ed", "articles:feature"), "a1", json!({ "featured": true })).await, Ok(()));
    // The same token may still change other fields.
    assert_eq!(put(tok("ed", ""), "a1", json!({ "title": "Edited" })).await, Ok(()));
    let mut r = client(s.addr).await;
    let a1 = r
        .get_entity(authed(
            &tok("root", ""),
            pb::GetEntityRequest { uid: uid("Article", "a1"), action: "ReadArticle".into() },
        ))
        .await
        .unwrap()
        .into_inner()
        .entity
        .unwrap();
    assert_eq!(a1.version, 5, "draft -> review -> published, featured, title");
}

crate::on_both_backends!(property_rules_enforced);
