//! Envoy ext_authz over envoy-types' generated client: a route map turns HTTP requests
//! into Cedar requests; bad tokens get 401 with WWW-Authenticate, denials and unmapped
//! routes 403; allows add the principal and remove the authorization header; revocation
//! applies at once; every decision is in the audit log. Paths are decided as the upstream
//! routes them (decoded once; ambiguous ones refused with 403, audited, bounded); the
//! principal header overwrites a forged one; `header_map` is read like `headers`.

use crate::common::*;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request as AttrRequest};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use lockstep::engine::{CallOptions, Caller};
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
    check_with(method, path, headers, None)
}

fn check_with(
    method: &str,
    path: &str,
    headers: HashMap<String, String>,
    header_map: Option<HeaderMap>,
) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    headers,
                    header_map,
                    ..Default::default()
                }),
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

/// Routes for the path tests: a nested template (double substitution) and a template
/// that takes the entity type from the path (an invalid type must be a denial).
const PATH_ROUTES: &str = r#"{"routes": [
  {"method": "GET", "path": "/items/{id}", "action": "ReadItem", "resource": {"type": "Item", "id": "{id}"}},
  {"method": "DELETE", "path": "/items/{id}", "action": "DeleteItem", "resource": {"type": "Item", "id": "{id}"}},
  {"method": "GET", "path": "/orgs/{org}/items/{id}", "action": "ReadItem", "resource": {"type": "Item", "id": "{org}/{id}"}},
  {"method": "GET", "path": "/kinds/{ty}/{id}", "action": "ReadItem", "resource": {"type": "{ty}", "id": "{id}"}}
]}"#;

/// alice reads any item except `Item::"secret"`; `Item::"doc/doc"` is mallory's.
const PATH_POLICIES: &str = r#"
@id("alice-reads") permit (principal == User::"alice", action == Action::"ReadItem", resource is Item);
@id("no-secret") forbid (principal, action, resource == Item::"secret");
"#;

const PATH_ENTITIES: &str = r#"[
  { "uid": { "type": "Item", "id": "doc1" }, "attrs": { "owner": { "__entity": { "type": "User", "id": "alice" } } } },
  { "uid": { "type": "Item", "id": "secret" }, "attrs": { "owner": { "__entity": { "type": "User", "id": "alice" } } } },
  { "uid": { "type": "Item", "id": "doc/doc" }, "attrs": { "owner": { "__entity": { "type": "User", "id": "mallory" } } } }
]"#;

/// A server with the edge routes, the harness policies plus `extra`, and `entities`.
async fn edge_server(base: &TestServer, routes: &str, extra: &str, entities: &str) -> std::net::SocketAddr {
    let store = lockstep::store::open(&base.url, &Default::default()).await.unwrap();
    let engine = lockstep::engine::Engine::new(store, Default::default())
        .with_edge_routes(lockstep::edge::RouteMap::parse(routes).unwrap());
    let policies = format!("{POLICIES}{extra}");
    engine.put_policies(Caller::Operator, &policies, SCHEMA, false, CallOptions::default()).await.unwrap();
    engine.import_entities(lockstep::cli::parse_entities(entities).unwrap()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(lockstep::server::run(Arc::new(engine), listener, std::future::pending()));
    addr
}

/// The detail of the last KIND_EDGE_DECISION event.
async fn last_edge_detail(addr: std::net::SocketAddr) -> String {
    let events = audit(addr).await;
    let e = events.iter().rev().find(|e| e.kind == pb::audit_event::Kind::EdgeDecision as i32).unwrap();
    e.detail.clone()
}

async fn ext_authz_decides_on_the_path_the_upstream_routes(b: Backend) {
    let Some(base) = start(b).await else { return };
    let addr = edge_server(&base, PATH_ROUTES, PATH_POLICIES, PATH_ENTITIES).await;
    let mut c = AuthorizationClient::new(channel(addr).await);
    let alice = token("k1", "alice");
    let mallory = token("k1", "mallory");
    let status = |r: Result<tonic::Response<CheckResponse>, tonic::Status>| http_status(&r.unwrap().into_inner());

    // Decoded once: `doc%31` is `doc1` (alice owns it), `secre%74` is `secret` (forbidden).
    assert_eq!(status(c.check(check("DELETE", "/items/doc%31", Some(&alice))).await), 200);
    let d = last_edge_detail(addr).await;
    assert!(d.contains(r#"on Item::"doc1""#), "{d}");
    assert_eq!(status(c.check(check("GET", "/items/doc1", Some(&alice))).await), 200);
    assert_eq!(status(c.check(check("GET", "/items/secret", Some(&alice))).await), 403);
    assert_eq!(status(c.check(check("GET", "/items/secre%74", Some(&alice))).await), 403);
    let d = last_edge_detail(addr).await;
    assert!(d.contains(r#"on Item::"secret""#) && d.contains("no-secret"), "{d}");

    // What an upstream could read another way is refused, audited with a reason.
    for (path, reason) in [
        ("/items/doc1%2F..", "encoded path separator"),
        ("/items/doc1;x=1", "`;`"),
        ("/items/..", "dot segment"),
        ("/items/doc%2531", "double encoding"),
        ("/items/doc%00", "control character"),
        ("/items/doc%FF", "not UTF-8"),
    ] {
        assert_eq!(status(c.check(check("GET", path, Some(&alice))).await), 403, "{path}");
        let d = last_edge_detail(addr).await;
        assert!(d.starts_with("deny GET ") && d.contains(reason), "{path}: {d}");
    }

    // One pass: the captured `{id}` is not expanded again (it would read `doc/doc`, mallory's).
    for path in ["/orgs/%7Bid%7D/items/doc", "/orgs/{id}/items/doc"] {
        assert_eq!(status(c.check(check("GET", path, Some(&mallory))).await), 403, "{path}");
        let d = last_edge_detail(addr).await;
        assert!(d.contains(r#"on Item::"{id}/doc""#), "{d}");
    }
    assert_eq!(status(c.check(check("GET", "/orgs/doc/items/doc", Some(&mallory))).await), 200);

    // An invalid entity type or an over-long id from the path is a denial, not INTERNAL.
    assert_eq!(status(c.check(check("GET", "/kinds/not%20a%20type/x", Some(&alice))).await), 403);
    assert!(last_edge_detail(addr).await.contains("resource: "));
    let long = format!("/items/{}", "a".repeat(2000));
    assert_eq!(status(c.check(check("GET", &long, Some(&alice))).await), 403);
    assert!(last_edge_detail(addr).await.contains("resource: "));

    // A 3 MB path or method is refused, and its audit row stays small.
    let huge = format!("/items/{}", "a".repeat(3 << 20));
    assert_eq!(status(c.check(check("GET", &huge, Some(&alice))).await), 403);
    let d = last_edge_detail(addr).await;
    assert!(d.len() < 1024 && d.contains("8 KiB"), "{} bytes: {}", d.len(), &d[..d.len().min(200)]);
    assert_eq!(status(c.check(check(&"G".repeat(3 << 20), "/items/doc1", Some(&alice))).await), 403);
    let d = last_edge_detail(addr).await;
    assert!(d.len() < 1024 && d.contains("method"), "{} bytes", d.len());
}

async fn ext_authz_reads_header_map_and_overwrites_the_principal(b: Backend) {
    let Some(base) = start(b).await else { return };
    let addr = edge_server(&base, PATH_ROUTES, PATH_POLICIES, PATH_ENTITIES).await;
    let mut c = AuthorizationClient::new(channel(addr).await);
    let alice = token("k1", "alice");

    // The client forges the principal header; the check response overwrites it.
    let headers = HashMap::from([
        ("authorization".to_string(), format!("Bearer {alice}")),
        ("x-lockstep-principal".to_string(), r#"User::"root""#.to_string()),
    ]);
    let r = c.check(check_with("GET", "/items/doc1", headers, None)).await.unwrap().into_inner();
    let Some(HttpResponse::OkResponse(o)) = &r.http_response else { panic!("{r:?}") };
    let set: Vec<_> = o.headers.iter().filter(|h| h.header.as_ref().unwrap().key == "x-lockstep-principal").collect();
    assert_eq!(set.len(), 1, "{o:?}");
    assert_eq!(set[0].header.as_ref().unwrap().value, r#"User::"alice""#);
    assert_eq!(set[0].append_action, HeaderAppendAction::OverwriteIfExistsOrAdd as i32, "{o:?}");
    assert!(!o.headers_to_remove.iter().any(|h| h == "x-lockstep-principal"), "removal runs after the set");
    assert_eq!(o.headers_to_remove, vec!["authorization"]);

    // `encode_raw_headers`: the same request with `header_map` (raw_value) instead of `headers`.
    let raw =
        |key: &str, v: &str| HeaderValue { key: key.into(), raw_value: v.as_bytes().to_vec(), ..Default::default() };
    let map =
        HeaderMap { headers: vec![raw(":path", "/items/doc1"), raw("authorization", &format!("Bearer {alice}"))] };
    let r = c.check(check_with("GET", "/items/doc1", HashMap::new(), Some(map))).await.unwrap().into_inner();
    assert_eq!(http_status(&r), 200, "{r:?}");
    let map = HeaderMap { headers: vec![raw("authorization", &format!("Bearer {alice}"))] };
    assert_eq!(
        http_status(
            &c.check(check_with("GET", "/items/secret", HashMap::new(), Some(map))).await.unwrap().into_inner()
        ),
        403
    );
    // Two different tokens are refused, not one picked.
    let mallory = token("k1", "mallory");
    let map = HeaderMap { headers: vec![raw("authorization", &format!("Bearer {mallory}"))] };
    let headers = HashMap::from([("authorization".to_string(), format!("Bearer {alice}"))]);
    assert_eq!(
        http_status(&c.check(check_with("GET", "/items/doc1", headers, Some(map))).await.unwrap().into_inner()),
        401
    );
    let bad = HeaderMap {
        headers: vec![HeaderValue { key: "authorization".into(), raw_value: vec![0xff, 0xfe], ..Default::default() }],
    };
    assert_eq!(
        http_status(&c.check(check_with("GET", "/items/doc1", HashMap::new(), Some(bad))).await.unwrap().into_inner()),
        401
    );
}

crate::on_both_backends!(
    ext_authz_maps_routes_to_decisions,
    ext_authz_decides_on_the_path_the_upstream_routes,
    ext_authz_reads_header_map_and_overwrites_the_principal
);
