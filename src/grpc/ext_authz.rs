//! Envoy's external authorization (`envoy.service.auth.v3.Authorization/Check`) on the
//! same port: the bearer token of the HTTP request verified and revocation-checked like
//! any call, the route map turning method and path into a Cedar request, the decision
//! audited. 401 (with `WWW-Authenticate`) for a bad or missing token, 403 for a denial
//! or an unmapped or refused route (see `edge::decode_segment`); on allow, the principal
//! is set as `x-lockstep-principal` — overwriting any copy the client sent, so the upstream
//! never reads a forged one — and the `authorization` header removed. The token is read
//! from `headers` or from `header_map` (Envoy's `encode_raw_headers`). Database trouble is
//! a gRPC error, which Envoy (with `failure_mode_allow: false`) turns into a denial.

use crate::edge::RouteMap;
use crate::engine::{CallOptions, Engine};
use crate::error::Error;
use crate::token;
use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction, HttpStatusCode, OkHttpResponse,
};
use envoy_types::ext_authz::v3::{CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub use envoy_types::ext_authz::v3::pb::AuthorizationServer;

/// Every header Lockstep sets replaces the request's (or reply's) copies: Envoy's default,
/// append, would leave a client's own `x-lockstep-principal` first in line for the upstream.
/// (Not remove-then-add: Envoy applies `headers_to_remove` after the headers it sets.)
const SET: Option<HeaderAppendAction> = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);

/// The request's `authorization` values, from `headers` (Envoy's default) and from
/// `header_map` (with `encode_raw_headers`, values in `raw_value`). A value that is not
/// UTF-8 is kept as an invalid one, so that it is refused rather than skipped.
fn authorization(http: &HttpRequest) -> Vec<String> {
    let mut found: Vec<String> =
        http.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("authorization")).map(|(_, v)| v.clone()).collect();
    for h in http.header_map.iter().flat_map(|m| &m.headers) {
        if h.key.eq_ignore_ascii_case("authorization") {
            let v = match (h.raw_value.is_empty(), std::str::from_utf8(&h.raw_value)) {
                (true, _) => h.value.clone(),
                (false, Ok(v)) => v.to_owned(),
                (false, Err(_)) => "\u{fffd}".to_owned(),
            };
            found.push(v);
        }
    }
    found.dedup();
    found
}

pub struct ExtAuthzService {
    pub engine: Arc<Engine>,
    pub routes: Arc<RouteMap>,
}

fn denied(code: HttpStatusCode, grpc: Status, www_authenticate: Option<&str>, body: &str) -> CheckResponse {
    let mut b = DeniedHttpResponseBuilder::new();
    b.set_http_status(code);
    if let Some(w) = www_authenticate {
        b.add_header("www-authenticate", w, SET, false);
    }
    b.set_body(body);
    let http: DeniedHttpResponse = b.build();
    let mut r = CheckResponse::with_status(grpc);
    r.set_http_response(http);
    r
}

fn unauthorized(reason: &str) -> CheckResponse {
    let www = "Bearer realm=\"lockstep\", error=\"invalid_token\"";
    denied(HttpStatusCode::Unauthorized, Status::unauthenticated(reason), Some(www), "unauthorized\n")
}

#[tonic::async_trait]
impl Authorization for ExtAuthzService {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let req = request.into_inner();
        let Some(http) = req.attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref()) else {
            return Ok(Response::new(denied(
                HttpStatusCode::Forbidden,
                Status::permission_denied("no HTTP attributes"),
                None,
                "forbidden\n",
            )));
        };
        let values = authorization(http);
        if values.len() > 1 {
            return Ok(Response::new(unauthorized("more than one authorization header")));
        }
        let raw = match token::bearer(values.first().map(String::as_str)) {
            Ok(t) => t.to_owned(),
            Err(e) => return Ok(Response::new(unauthorized(&e.to_string()))),
        };
        let resolved = self.routes.resolve(&http.method, &http.path);
        let target = match &resolved {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err("no route matches"),
            Err(reason) => Err(*reason),
        };
        match self.engine.edge_check(&raw, &http.method, &http.path, target, CallOptions::default()).await {
            Ok((decision, principal)) if decision.allowed => {
                let mut ok = OkHttpResponseBuilder::new();
                ok.add_header("x-lockstep-principal", principal.to_string(), SET, false);
                ok.remove_header("authorization");
                let http: OkHttpResponse = ok.build();
                let mut r = CheckResponse::with_status(Status::ok("allowed"));
                r.set_http_response(http);
                Ok(Response::new(r))
            }
            Ok(_) => Ok(Response::new(denied(
                HttpStatusCode::Forbidden,
                Status::permission_denied("denied by policy"),
                None,
                "forbidden\n",
            ))),
            Err(Error::Unauthenticated(m) | Error::UnknownKey(m)) => Ok(Response::new(unauthorized(&m))),
            Err(e) => Err(e.into()),
        }
    }
}
