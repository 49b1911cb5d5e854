//! Envoy ext_authz over envoy-types' generated client: a route map turns HTTP requests
//! into Cedar requests; bad tokens get 401 with WWW-Authenticate, denials and unmapped
//! routes 403; allows add the principal and remove the authorization header; revocation
//! applies at once; every decision is in the audit log.

use crate::common::*;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request as AttrRequest};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use lockstep::grpc::pb;
use std::collections::HashMap;
use std::sync::Arc;

const ROUTES: &str = r#"{"routes": [
  {"method": "PUT", "path": "/items/{id}", "action": "UpdateItem", "resource": {"type": "Item", "id": "{id}"}},
  {"method": "GET", "path": "/items/{id}", "action": "ReadItem", "resource": {"type": "Item", "id": "{id}"}}
]}"#;

fn check(method: &str, path: &str, token: Option<&str>) -> CheckRequest {
    let mut headers = HashMap::new();
    if let Some(t) = token {
        headers.insert("authorization".to_string(), format!("Bearer {t}"));
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest { method: method.into(), path: path.into(), headers, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

fn http_status(r: &CheckResponse) -> u16 {
    match &r.http_response {
        Some(HttpResponse::OkResponse(_)) => 200,
        Some(HttpResponse::DeniedResponse(d)) => d.status.as_ref().map_or(0, |s| s.code as u16),
        other => panic!("unexpected {other:?}"),
    }
}

async fn ext_authz_maps_routes_to_decisions(b: Backend) {
    let Some(base) = start(b).await else { return };
    let store = lockstep::store::open(&base.url, &Default::default()).await.unwrap();
    let engine = lockstep::engine::Engine::new(store, Default::default())
        .with_edge_routes(lockstep::edge::RouteMap::parse(ROUTES).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(lockstep::server::run(Arc::new(engine), listener, std::future::pending()));
    let mut c = AuthorizationClient::new(channel(addr).await);

    let alice = token("k1", "alice");
    let ok = c.check(check("PUT", "/items/doc?x=1", Some(&alice))).await.unwrap().into_inner();
    assert_eq!(http_status(&ok), 200);
    let Some(HttpResponse::OkResponse(o)) = &ok.http_response else { unreachable!() };
    assert!(
        o.headers.iter().any(|h| h
            .header
            .as_ref()
            .is_some_and(|h| h.key == "x-lockstep-principal" && h.value == "User::\"alice\""))
    );
    assert_eq!(o.headers_to_remove, vec!["authorization"]);

    assert_eq!(
        http_status(&c.check(check("PUT", "/items/doc", Some(&token("k1", "mallory")))).await.unwrap().into_inner()),
        403
    );
    assert_eq!(
        http_status(&c.check(check("DELETE", "/items/doc", Some(&alice))).await.unwrap().into_inner()),
        403,
        "unmapped route"
    );
    let unauth = c.check(check("PUT", "/items/doc", None)).await.unwrap().into_inner();
    assert_eq!(http_status(&unauth), 401);
    let Some(HttpResponse::DeniedResponse(d)) = &unauth.http_response else { unreachable!() };
    assert!(
        d.headers
            .iter()
            .any(|h| h.header.as_ref().is_some_and(|h| h.key == "www-authenticate" && h.value.starts_with("Bearer")))
    );
    assert_eq!(http_status(&c.check(check("PUT", "/items/doc", Some("garbage"))).await.unwrap().into_inner()), 401);

    // Revocation applies at the edge at once.
    client(addr).await.revoke_token(authed(&alice, pb::RevokeTokenRequest::default())).await.unwrap();
    assert_eq!(http_status(&c.check(check("PUT", "/items/doc", Some(&alice))).await.unwrap().into_inner()), 401);

    let edge: Vec<String> = audit(addr)
        .await
        .into_iter()
        .filter(|e| e.kind == pb::audit_event::Kind::EdgeDecision as i32)
        .map(|e| e.detail)
        .collect();
    assert_eq!(edge.len(), 3, "{edge:?}");
    assert!(
        edge[0].starts_with("allow PUT /items/doc") && edge[1].starts_with("deny PUT") && edge[2].contains("DELETE"),
        "{edge:?}"
    );
}

crate::on_both_backends!(ext_authz_maps_routes_to_decisions);
