//! Conversions between protobuf messages and domain types, with the input checks that
//! belong to decoding (shapes, number kinds, nesting). pb types go no further than here.

use super::pb;
use crate::error::Error;
use crate::model::{
    Attributes, AuditEvent, AuditKind, Change, CommitRequest, CommitResult, EntityRecord, KeyRecord, Mutation,
    TemplateLink, Uid,
};
use prost_types::value::Kind;
use serde_json::{Map, Number, Value};

type Result<T> = std::result::Result<T, Error>;

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// Largest integer a protobuf double carries exactly.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// A `Struct` to attributes in Cedar JSON. Numbers must be integral (Cedar Longs) and
/// within ±2^53; `null` is allowed only where `allow_null` (merge patches, where it removes).
pub fn struct_to_attributes(
    s: Option<prost_types::Struct>,
    what: &str,
    max_depth: usize,
    allow_null: bool,
) -> Result<Attributes> {
    let mut out = Map::new();
    if let Some(s) = s {
        for (k, v) in s.fields {
            let path = format!("{what}.{k}");
            out.insert(k, value_to_json(v, &path, 1, max_depth, allow_null)?);
        }
    }
    Ok(out)
}

fn value_to_json(v: prost_types::Value, path: &str, depth: usize, max_depth: usize, allow_null: bool) -> Result<Value> {
    if depth > max_depth {
        return Err(invalid(format!("`{path}` nests deeper than {max_depth} levels")));
    }
    match v.kind {
        None | Some(Kind::NullValue(_)) => {
            if allow_null {
                Ok(Value::Null)
            } else {
                Err(invalid(format!(
                    "`{path}` is null; Cedar has no null (in a merge_patch, null removes an attribute)"
                )))
            }
        }
        Some(Kind::BoolValue(b)) => Ok(Value::Bool(b)),
        Some(Kind::StringValue(s)) => Ok(Value::String(s)),
        Some(Kind::NumberValue(n)) => {
            if !n.is_finite() || n.fract() != 0.0 || n.abs() > MAX_SAFE_INTEGER {
                return Err(invalid(format!(
                    "`{path}` is {n}: Cedar numbers are integers (Longs) within ±2^53 here; send other numbers as strings"
                )));
            }
            Ok(Value::Number(Number::from(n as i64)))
        }
        Some(Kind::ListValue(l)) => l
            .values
            .into_iter()
            .enumerate()
            .map(|(i, x)| value_to_json(x, &format!("{path}[{i}]"), depth + 1, max_depth, false))
            .collect::<Result<Vec<_>>>()
            .map(Value::Array),
        Some(Kind::StructValue(s)) => {
            let mut m = Map::new();
            for (k, x) in s.fields {
                let p = format!("{path}.{k}");
                m.insert(k, value_to_json(x, &p, depth + 1, max_depth, allow_null)?);
            }
            Ok(Value::Object(m))
        }
    }
}

/// Attributes back to a `Struct` (integers become doubles, exact within ±2^53).
pub fn attributes_to_struct(a: &Attributes) -> prost_types::Struct {
    prost_types::Struct { fields: a.iter().map(|(k, v)| (k.clone(), json_to_value(v))).collect() }
}

fn json_to_value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue { values: a.iter().map(json_to_value).collect() }),
        Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o.iter().map(|(k, v)| (k.clone(), json_to_value(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn uid(r: Option<pb::EntityRef>, what: &str) -> Result<Uid> {
    let r = r.ok_or_else(|| invalid(format!("`{what}` is missing: give an entity type and id")))?;
    uid_of(r, what)
}

fn uid_of(r: pb::EntityRef, what: &str) -> Result<Uid> {
    if r.r#type.is_empty() || r.id.is_empty() {
        return Err(invalid(format!("`{what}` needs both `type` and `id`")));
    }
    Ok(Uid::new(r.r#type, r.id))
}

fn uids(v: Vec<pb::EntityRef>, what: &str) -> Result<Vec<Uid>> {
    v.into_iter().map(|r| uid_of(r, what)).collect()
}

pub fn entity_ref(u: &Uid) -> pb::EntityRef {
    pb::EntityRef { r#type: u.ty.clone(), id: u.id.clone() }
}

pub fn entity(e: &EntityRecord) -> pb::Entity {
    pb::Entity {
        uid: Some(entity_ref(&e.uid)),
        attributes: Some(attributes_to_struct(&e.attributes)),
        parents: e.parents.iter().map(entity_ref).collect(),
        version: e.version,
        tags: (!e.tags.is_empty()).then(|| attributes_to_struct(&e.tags)),
    }
}

pub fn mutation(m: pb::Mutation, i: usize, max_depth: usize) -> Result<Mutation> {
    let at = |s: &str| format!("mutations[{i}].{s}");
    if m.action.is_empty() {
        return Err(invalid(format!("{} is empty: name a Cedar action", at("action"))));
    }
    let resource = uid(m.resource, &at("resource"))?;
    let change = match m.change {
        None => return Err(invalid(format!("mutations[{i}] has no change: set one of create, update, delete"))),
        Some(pb::mutation::Change::Create(c)) => Change::Create {
            attributes: struct_to_attributes(c.attributes, &at("create.attributes"), max_depth, false)?,
            parents: uids(c.parents, &at("create.parents"))?,
            tags: struct_to_attributes(c.tags, &at("create.tags"), max_depth, false)?,
        },
        Some(pb::mutation::Change::Update(u)) => Change::Update {
            merge_patch: struct_to_attributes(u.merge_patch, &at("update.merge_patch"), max_depth, true)?,
            add_parents: uids(u.add_parents, &at("update.add_parents"))?,
            remove_parents: uids(u.remove_parents, &at("update.remove_parents"))?,
            tags_merge_patch: struct_to_attributes(
                u.tags_merge_patch,
                &at("update.tags_merge_patch"),
                max_depth,
                true,
            )?,
        },
        Some(pb::mutation::Change::Delete(_)) => Change::Delete,
    };
    Ok(Mutation { action: m.action, resource, change, if_version: m.if_version })
}

pub fn mutation_to_pb(m: &Mutation) -> pb::Mutation {
    let change = match &m.change {
        Change::Create { attributes, parents, tags } => pb::mutation::Change::Create(pb::CreateEntity {
            attributes: Some(attributes_to_struct(attributes)),
            parents: parents.iter().map(entity_ref).collect(),
            tags: (!tags.is_empty()).then(|| attributes_to_struct(tags)),
        }),
        Change::Update { merge_patch, add_parents, remove_parents, tags_merge_patch } => {
            pb::mutation::Change::Update(pb::UpdateEntity {
                merge_patch: Some(attributes_to_struct(merge_patch)),
                add_parents: add_parents.iter().map(entity_ref).collect(),
                remove_parents: remove_parents.iter().map(entity_ref).collect(),
                tags_merge_patch: (!tags_merge_patch.is_empty()).then(|| attributes_to_struct(tags_merge_patch)),
            })
        }
        Change::Delete => pb::mutation::Change::Delete(pb::DeleteEntity {}),
    };
    pb::Mutation {
        action: m.action.clone(),
        resource: Some(entity_ref(&m.resource)),
        change: Some(change),
        if_version: m.if_version,
    }
}

pub fn commit_request(r: pb::AuthorizeAndCommitRequest, max_depth: usize) -> Result<CommitRequest> {
    Ok(CommitRequest {
        mutations: r
            .mutations
            .into_iter()
            .enumerate()
            .map(|(i, m)| mutation(m, i, max_depth))
            .collect::<Result<_>>()?,
        context: struct_to_attributes(r.context, "context", max_depth, false)?,
        idempotency_key: r.idempotency_key,
    })
}

pub fn commit_response(r: CommitResult) -> pb::AuthorizeAndCommitResponse {
    pb::AuthorizeAndCommitResponse {
        entities: r.entities.iter().map(entity).collect(),
        audit_seq: r.audit_seq,
        determining_policies: r.determining_policies,
    }
}

pub fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

pub fn audit_event(e: &AuditEvent) -> pb::AuditEvent {
    let kind = match e.event.kind {
        AuditKind::Commit => pb::audit_event::Kind::Commit,
        AuditKind::Deny => pb::audit_event::Kind::Deny,
        AuditKind::AuditExported => pb::audit_event::Kind::AuditExported,
        AuditKind::RevokeToken => pb::audit_event::Kind::RevokeToken,
        AuditKind::RevokeSubject => pb::audit_event::Kind::RevokeSubject,
        AuditKind::RevokeKey => pb::audit_event::Kind::RevokeKey,
        AuditKind::AddKey => pb::audit_event::Kind::AddKey,
        AuditKind::PutPolicies => pb::audit_event::Kind::PutPolicies,
        AuditKind::EdgeDecision => pb::audit_event::Kind::EdgeDecision,
    };
    pb::AuditEvent {
        seq: e.seq,
        time: Some(timestamp(e.time)),
        kind: kind as i32,
        principal: e.event.principal.as_ref().map(entity_ref),
        token_id: e.event.token_id.clone(),
        mutations: e.event.mutations.iter().map(mutation_to_pb).collect(),
        entities: e.event.entities.iter().map(entity).collect(),
        detail: e.event.detail.clone(),
    }
}

pub fn key_record(r: pb::AddKeyRequest) -> KeyRecord {
    KeyRecord {
        kid: r.kid,
        algorithm: r.algorithm,
        secret: r.secret,
        public_key_pem: r.public_key_pem,
        issuer: r.issuer,
        audience: r.audience,
        principal_type: r.principal_type,
        required_typ: r.required_typ,
        max_lifetime_secs: i64::try_from(r.max_lifetime_seconds).unwrap_or(i64::MAX),
        ..KeyRecord::default()
    }
}

pub fn template_link(l: Option<pb::TemplateLink>) -> Result<TemplateLink> {
    let l = l.ok_or_else(|| invalid("`link` is missing"))?;
    if l.template_id.is_empty() || l.link_id.is_empty() {
        return Err(invalid("a link needs `template_id` and `link_id`"));
    }
    Ok(TemplateLink {
        link_id: l.link_id,
        template_id: l.template_id,
        principal: l.principal.map(|p| uid_of(p, "link.principal")).transpose()?,
        resource: l.resource.map(|r| uid_of(r, "link.resource")).transpose()?,
    })
}

pub fn template_link_to_pb(l: &TemplateLink) -> pb::TemplateLink {
    pb::TemplateLink {
        link_id: l.link_id.clone(),
        template_id: l.template_id.clone(),
        principal: l.principal.as_ref().map(entity_ref),
        resource: l.resource.as_ref().map(entity_ref),
    }
}

/// Key metadata only: the secret never leaves the server.
pub fn key_info(k: &KeyRecord) -> pb::KeyInfo {
    pb::KeyInfo {
        kid: k.kid.clone(),
        algorithm: k.algorithm.clone(),
        issuer: k.issuer.clone(),
        audience: k.audience.clone(),
        principal_type: k.principal_type.clone(),
        revoked: k.revoked,
        added_at: Some(timestamp(k.added_at)),
        required_typ: k.required_typ.clone(),
        max_lifetime_seconds: u64::try_from(k.max_lifetime_secs).unwrap_or(0),
        source: k.source.clone(),
        retired: k.retired,
        signing: k.signing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(n: f64) -> prost_types::Value {
        prost_types::Value { kind: Some(Kind::NumberValue(n)) }
    }

    #[test]
    fn fractions_and_nulls_are_refused() {
        let mut s = prost_types::Struct::default();
        s.fields.insert("x".into(), num(1.5));
        assert!(struct_to_attributes(Some(s.clone()), "a", 8, false).is_err());
        s.fields.insert("x".into(), num(3.0));
        assert_eq!(struct_to_attributes(Some(s), "a", 8, false).unwrap()["x"], Value::from(3));
        let mut n = prost_types::Struct::default();
        n.fields.insert("x".into(), prost_types::Value { kind: Some(Kind::NullValue(0)) });
        assert!(struct_to_attributes(Some(n.clone()), "a", 8, false).is_err());
        assert!(struct_to_attributes(Some(n), "a", 8, true).is_ok());
    }

    #[test]
    fn nesting_is_bounded() {
        let mut v = num(1.0);
        for _ in 0..20 {
            let mut s = prost_types::Struct::default();
            s.fields.insert("n".into(), v);
            v = prost_types::Value { kind: Some(Kind::StructValue(s)) };
        }
        let mut s = prost_types::Struct::default();
        s.fields.insert("deep".into(), v);
        assert!(struct_to_attributes(Some(s), "a", 16, false).is_err());
    }
}
