//! The gRPC transport: generated code, thin handlers (pb -> domain -> use case -> pb),
//! and the single mapping of errors to status codes.

pub mod convert;
pub mod ext_authz;
pub mod layer;

use crate::engine::{CallOptions, Caller, Engine};
use crate::error::Error;
use crate::token;
use prost::Message;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// Generated protobuf and gRPC code for `lockstep.v1`.
#[rustfmt::skip]
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("lockstep.v1");

    /// The descriptor set served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lockstep_descriptor");
}

/// The one mapping from use-case errors to gRPC statuses; no wildcard arm, so a new
/// variant cannot silently become INTERNAL.
impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Unauthenticated(m) | Error::UnknownKey(m) => Status::unauthenticated(m),
            Error::Denied(m) => Status::permission_denied(m),
            Error::DeniedExplained { message, mutation, policies } => {
                use tonic_types::{ErrorDetails, StatusExt};
                let metadata = std::collections::HashMap::from([
                    ("mutation".to_string(), mutation.to_string()),
                    ("determining_policies".to_string(), policies.join(",")),
                ]);
                let details = ErrorDetails::with_error_info("POLICY_DENIED", "lockstep.v1", metadata);
                Status::with_error_details(tonic::Code::PermissionDenied, message, details)
            }
            Error::Aborted(m) => Status::aborted(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::InvalidArgument(m) => Status::invalid_argument(m),
            Error::Unavailable(m) => Status::unavailable(m),
            Error::Retry(m) => {
                Status::unavailable(format!("{m}; retries exhausted, nothing was committed, retry later"))
            }
            Error::OutcomeUnknown(m) => Status::unknown(m),
            Error::DeadlineExceeded => Status::deadline_exceeded(Error::DeadlineExceeded.to_string()),
            Error::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Status::internal(
                    "internal error; nothing was committed unless the audit log says so; see the server log",
                )
            }
        }
    }
}

/// What every call carries besides its message: the bearer token and the deadline.
struct Call {
    bearer: Result<String, Error>,
    opts: CallOptions,
}

impl Call {
    /// Reads metadata and checks the message size before anything else happens.
    fn of<T: Message>(req: &Request<T>, engine: &Engine) -> Result<Self, Status> {
        let max = engine.settings().max_request_bytes;
        let len = req.get_ref().encoded_len();
        if len > max {
            return Err(Status::invalid_argument(format!("request is {len} bytes; at most {max}")));
        }
        let bearer = match req.metadata().get("authorization") {
            None => token::bearer(None).map(str::to_owned),
            Some(v) => match v.to_str() {
                Ok(s) => token::bearer(Some(s)).map(str::to_owned),
                Err(_) => Err(Error::Unauthenticated("`authorization` metadata is not valid ASCII".into())),
            },
        };
        let deadline = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            // Give up a little before the caller does, so that the server's DEADLINE_EXCEEDED
            // (sent only for a call that committed nothing) reaches the caller; once COMMIT
            // has started the answer is its outcome, however late (`grpc::layer`).
            // Counted from the call's arrival (`layer::Arrival`), so that time spent waiting
            // for admission is part of it: a call queued past its deadline commits nothing.
            .map(|d| arrived(req) + d.mul_f64(0.9).saturating_sub(Duration::from_millis(5)));
        Ok(Self { bearer, opts: CallOptions { deadline } })
    }

    fn bearer(&self) -> Result<&str, Status> {
        match &self.bearer {
            Ok(b) => Ok(b),
            Err(e) => Err(Status::unauthenticated(e.to_string())),
        }
    }
}

/// When the call reached the server (the layer's stamp; now, for a call that has none).
fn arrived<T>(req: &Request<T>) -> tokio::time::Instant {
    req.extensions().get::<layer::Arrival>().map_or_else(tokio::time::Instant::now, |a| a.0)
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub(crate) fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `lockstep.v1.Lockstep`.
pub struct LockstepService {
    pub engine: Arc<Engine>,
}

#[tonic::async_trait]
impl pb::lockstep_server::Lockstep for LockstepService {
    async fn authorize_and_commit(
        &self,
        request: Request<pb::AuthorizeAndCommitRequest>,
    ) -> Result<Response<pb::AuthorizeAndCommitResponse>, Status> {
        let call = Call::of(&request, &self.engine)?;
        let bearer = call.bearer()?;
        let req = convert::commit_request(request.into_inner(), self.engine.settings().max_value_depth)?;
        let result = self.engine.authorize_and_commit(bearer, &req, call.opts).await?;
        Ok(Response::new(convert::commit_response(result)))
    }

    async fn authorize(
        &self,
        request: Request<pb::AuthorizeRequest>,
    ) -> Result<Response<pb::AuthorizeResponse>, Status> {
        let call = Call::of(&request, &self.engine)?;
        let bearer = call.bearer()?;
        let r = request.into_inner();
        let resource = convert::uid(r.resource, "resource")?;
        let context =
            convert::struct_to_attributes(r.context, "context", self.engine.settings().max_value_depth, false)?;
        let d = self.engine.authorize(bearer, &r.action, &resource, &context, call.opts).await?;
        Ok(Response::new(pb::AuthorizeResponse {
            decision: if d.allowed { pb::Decision::Allow } else { pb::Decision::Deny } as i32,
            determining_policies: d.determining_policies,
            errors: d.errors,
        }))
    }

    async fn get_entity(
        &self,
        request: Request<pb::GetEntityRequest>,
    ) -> Result<Response<pb::GetEntityResponse>, Status> {
        let call = Call::of(&request, &self.engine)?;
        let bearer = call.bearer()?;
        let r = request.into_inner();
        let uid = convert::uid(r.uid, "uid")?;
        let e = self.engine.get_entity(bearer, &uid, &r.action, call.opts).await?;
        Ok(Response::new(pb::GetEntityResponse { entity: Some(convert::entity(&e)) }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let call = Call::of(&request, &self.engine)?;
        let bearer = call.bearer()?;
        let r = request.into_inner();
        let seq = self.engine.revoke_token(bearer, &r.jti, r.expires_at.map(|t| t.seconds), call.opts).await?;
        Ok(Response::new(pb::RevokeTokenResponse { audit_seq: seq }))
    }

    async fn revoke_subject(
        &self,
        request: Request<pb::RevokeSubjectRequest>,
    ) -> Result<Response<pb::RevokeSubjectResponse>, Status> {
        let call = Call::of(&request, &self.engine)?;
        let bearer = call.bearer()?;
        let r = request.into_inner();
        let subject = r.subject.map(|s| convert::uid(Some(s), "subject")).transpose()?;
        let seq = self.engine.revoke_subject(bearer, subject.as_ref(), call.opts).await?;
        Ok(Response::new(pb::RevokeSubjectResponse { audit_seq: seq }))
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let call = Call::of(&request, &self.engine)?;
        let bearer = call.bearer()?;
        let r = request.into_inner();
        let events = self.engine.list_audit(Caller::Bearer(bearer), r.after_seq, r.limit, call.opts).await?;
        Ok(Response::new(pb::ListAuditEventsResponse { events: events.iter().map(convert::audit_event).collect() }))
    }
}

/// `lockstep.v1.Admin`.
pub struct AdminService {
    pub engine: Arc<Engine>,
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn put_policies(
        &self,
        request: Request<pb::PutPoliciesRequest>,
    ) -> Result<Response<pb::PutPoliciesResponse>, Status> {
        let call = Call::of(&request, &self.engine)?;
        let bearer = call.bearer()?;
        let r = request.into_inner();
        let (version, seq) = self
            .engine
            .put_policies(Caller::Bearer(bearer), &r.policies, &r.schema, r.allow_lockout, call.opts)
            .await?;
        Ok(Response::new(pb::PutPoliciesResponse { version, audit_seq: seq }))
    }

    async fn get_policies(
        &self,
        request: Request<pb::GetPoliciesRequest>,
    ) -> Result<Response<pb::GetPoliciesResponse>, Status> {
        let call = Call::of(&request, &self.engine)?;
        let bearer = call.bearer()?;
        let p = self.engine.get_policies(Caller::Bearer(bearer), call.opts).await?;
        Ok(Response::new(match p {
            Some(p) => pb::GetPoliciesResponse { version: p.version, policies: p.policies, schema: p.schema },
            None => pb::GetPoliciesResponse::default(),
        }))
    }

    async fn add_key(&self, request: Request<pb::AddKeyRequest>) -> Result<Response<pb::AddKeyResponse>, Status> {
        let call = Call::of(&request, &self.engine)?;
        let bearer = call.bearer()?;
        let key = convert::key_record(request.into_inner());
        let seq = self.engine.add_key(Caller::Bearer(bearer), key, call.opts).await?;
        Ok(Response::new(pb::AddKeyResponse { audit_seq: seq }))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        let call = Call::of(&request, &self.engine)?;
        let bearer = call.bearer()?;
        let r = request.into_inner();
        if r.kid.is_empty() {
            return Err(Status::invalid_argument("kid is empty"));
        }
        let seq = self.engine.revoke_key(Caller::Bearer(bearer), &r.kid, call.opts).await?;
        Ok(Response::new(pb::RevokeKeyResponse { audit_seq: seq }))
    }

    async fn link_template(
        &self,
        request: Request<pb::LinkTemplateRequest>,
    ) -> Result<Response<pb::LinkTemplateResponse>, Status> {
        let call = Call::of(&request, &self.engine)?;
        let bearer = call.bearer()?;
        let link = convert::template_link(request.into_inner().link)?;
        let seq = self.engine.link_template(Caller::Bearer(bearer), link, call.opts).await?;
        Ok(Response::new(pb::LinkTemplateResponse { audit_seq: seq }))
    }

    async fn unlink_template(
        &self,
        request: Request<pb::UnlinkTemplateRequest>,
    ) -> Result<Response<pb::UnlinkTemplateResponse>, Status> {
        let call = Call::of(&request, &self.engine)?;
        let bearer = call.bearer()?;
        let r = request.into_inner();
        let seq = self.engine.unlink_template(Caller::Bearer(bearer), &r.link_id, call.opts).await?;
        Ok(Response::new(pb::UnlinkTemplateResponse { audit_seq: seq }))
    }

    async fn list_template_links(
        &self,
        request: Request<pb::ListTemplateLinksRequest>,
    ) -> Result<Response<pb::ListTemplateLinksResponse>, Status> {
        let call = Call::of(&request, &self.engine)?;
        let bearer = call.bearer()?;
        let links = self.engine.list_links(Caller::Bearer(bearer), call.opts).await?;
        Ok(Response::new(pb::ListTemplateLinksResponse {
            links: links.iter().map(convert::template_link_to_pb).collect(),
        }))
    }

    async fn list_keys(&self, request: Request<pb::ListKeysRequest>) -> Result<Response<pb::ListKeysResponse>, Status> {
        let call = Call::of(&request, &self.engine)?;
        let bearer = call.bearer()?;
        let keys = self.engine.list_keys(Caller::Bearer(bearer), call.opts).await?;
        Ok(Response::new(pb::ListKeysResponse { keys: keys.iter().map(convert::key_info).collect() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
