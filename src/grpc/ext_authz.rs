//! Envoy's external authorization (`envoy.service.auth.v3.Authorization/Check`) on the
//! same port: the bearer token of the HTTP request verified and revocation-checked like
//! any call, the route map turning method and path into a Cedar request, the decision
//! audited. 401 (with `WWW-Authenticate`) for a bad or missing token, 403 for a denial
//! or an unmapped route; on allow, the principal is added as `x-lockstep-principal` and
//! the `authorization` header removed. Database trouble is a gRPC error, which Envoy
//! (with `failure_mode_allow: false`) turns into a denial.

use crate::edge::RouteMap;
use crate::engine::{CallOptions, Engine};
use crate::error::Error;
use crate::token;
use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HttpStatusCode, OkHttpResponse,
};
use envoy_types::ext_authz::v3::{CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub use envoy_types::ext_authz::v3::pb::AuthorizationServer;

pub struct ExtAuthzService {
    pub engine: Arc<Engine>,
    pub routes: Arc<RouteMap>,
}

fn denied(code: HttpStatusCode, grpc: Status, www_authenticate: Option<&str>, body: &str) -> CheckResponse {
    let mut b = DeniedHttpResponseBuilder::new();
    b.set_http_status(code);
    if let Some(w) = www_authenticate {
        b.add_header("www-authenticate", w, None, false);
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
        let raw = match token::bearer(http.headers.get("authorization").map(String::as_str)) {
            Ok(t) => t.to_owned(),
            Err(e) => return Ok(Response::new(unauthorized(&e.to_string()))),
        };
        let target = self.routes.resolve(&http.method, &http.path);
        match self.engine.edge_check(&raw, &http.method, &http.path, target.as_ref(), CallOptions::default()).await {
            Ok((decision, principal)) if decision.allowed => {
                let mut ok = OkHttpResponseBuilder::new();
                ok.add_header("x-lockstep-principal", principal.to_string(), None, false);
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
