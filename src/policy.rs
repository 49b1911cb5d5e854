//! Cedar: compiling a policy set (with its optional schema), turning domain values into
//! Cedar requests and entities, and evaluating. Pure and synchronous; no I/O here.

use crate::model::{Decision, EntityRecord, TemplateLink, Uid};
use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet, Request,
    RestrictedExpression, Schema, SlotId, ValidationMode, Validator,
};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;

/// A parsed and validated policy set at one version: what the cache holds.
#[derive(Clone)]
pub struct CompiledPolicies {
    pub version: u64,
    /// The template-links generation this set includes.
    pub links: u64,
    pub set: PolicySet,
    pub schema: Option<Schema>,
    /// Action entities declared by the schema (so `action in Action::"group"` works).
    action_entities: Vec<cedar_policy::Entity>,
}

/// Messages of a policy or schema that does not compile, each `line:column: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileErrors(pub Vec<String>);

impl std::fmt::Display for CompileErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

/// Renders a Cedar diagnostic as `line:column: message (help)` lines, locating each label
/// in `src`.
fn diagnostics(d: &dyn miette::Diagnostic, src: &str, out: &mut Vec<String>) {
    let mut msg = d.to_string();
    if let Some(help) = d.help() {
        msg.push_str(&format!(" (help: {help})"));
    }
    let at = d.labels().and_then(|mut l| l.next()).map(|l| l.offset());
    match at {
        Some(off) => {
            let (line, col) = line_col(src, off);
            out.push(format!("{line}:{col}: {msg}"));
        }
        None => out.push(msg),
    }
    if let Some(related) = d.related() {
        for r in related {
            diagnostics(r, src, out);
        }
    }
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Parses `policies` (naming each policy by its `@id("…")` annotation when it has one),
/// and when `schema` is not empty parses it and validates the policies strictly.
pub fn compile(version: u64, policies: &str, schema: &str) -> Result<CompiledPolicies, CompileErrors> {
    let parsed = PolicySet::from_str(policies).map_err(|e| {
        let mut out = Vec::new();
        for err in e.iter() {
            diagnostics(err, policies, &mut out);
        }
        CompileErrors(out)
    })?;
    let mut set = PolicySet::new();
    let mut errors = Vec::new();
    for t in parsed.templates() {
        let t = match t.annotation("id") {
            Some(id) => t.new_id(PolicyId::new(id)),
            None => t.clone(),
        };
        if let Err(e) = set.add_template(t) {
            errors.push(e.to_string());
        }
    }
    for p in parsed.policies() {
        let p = match p.annotation("id") {
            Some(id) => p.new_id(PolicyId::new(id)),
            None => p.clone(),
        };
        if let Err(e) = set.add(p) {
            errors.push(format!("{e} (two policies share an `@id`)"));
        }
    }
    if !errors.is_empty() {
        return Err(CompileErrors(errors));
    }
    let (schema, action_entities) = if schema.trim().is_empty() {
        (None, Vec::new())
    } else {
        let (s, _warnings) = Schema::from_cedarschema_str(schema).map_err(|e| {
            let mut out = Vec::new();
            diagnostics(&e, schema, &mut out);
            CompileErrors(out.into_iter().map(|m| format!("schema {m}")).collect())
        })?;
        let result = Validator::new(s.clone()).validate(&set, ValidationMode::Strict);
        if !result.validation_passed() {
            let mut out = Vec::new();
            for e in result.validation_errors() {
                diagnostics(e, policies, &mut out);
            }
            return Err(CompileErrors(out));
        }
        let actions = s
            .action_entities()
            .map_err(|e| CompileErrors(vec![format!("schema actions: {e}")]))?
            .iter()
            .cloned()
            .collect();
        (Some(s), actions)
    };
    Ok(CompiledPolicies { version, links: 0, set, schema, action_entities })
}

/// A Cedar entity uid from a domain uid; the message says what is wrong with it.
pub fn entity_uid(uid: &Uid) -> Result<EntityUid, String> {
    let ty = EntityTypeName::from_str(&uid.ty).map_err(|_| format!("invalid Cedar entity type `{}`", uid.ty))?;
    Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(&uid.id)))
}

/// An action as callers write it: `UpdateItem` means `Action::"UpdateItem"`; a full uid
/// (`App::Action::"UpdateItem"`) is taken as written.
pub fn action_uid(action: &str) -> Result<EntityUid, String> {
    if action.is_empty() {
        return Err("action is empty: name a Cedar action, e.g. `UpdateItem`".into());
    }
    if action.contains('"') {
        let uid = EntityUid::from_str(action).map_err(|_| format!("invalid Cedar action uid `{action}`"))?;
        let ty = uid.type_name().to_string();
        if ty != "Action" && !ty.ends_with("::Action") {
            return Err(format!("`{action}` is not an action: its type must be `Action` or end in `::Action`"));
        }
        return Ok(uid);
    }
    Ok(EntityUid::from_type_name_and_id(
        EntityTypeName::from_str("Action").map_err(|e| e.to_string())?,
        EntityId::new(action),
    ))
}

/// The entity in Cedar's JSON entity format.
pub fn entity_json(e: &EntityRecord) -> Value {
    json!({
        "uid": { "type": e.uid.ty, "id": e.uid.id },
        "attrs": e.attributes,
        "parents": e.parents,
    })
}

/// Checks that an entity is valid Cedar data (types, entity references, extension values).
pub fn check_entity(e: &EntityRecord) -> Result<(), String> {
    entity_uid(&e.uid)?;
    for p in &e.parents {
        entity_uid(p)?;
    }
    cedar_entity(e).map(|_| ())
}

/// The Cedar entity of a record.
fn cedar_entity(e: &EntityRecord) -> Result<Entity, String> {
    let direct = || {
        let attrs =
            e.attributes.iter().map(|(k, v)| Some((k.clone(), cedar_value(v)?))).collect::<Option<HashMap<_, _>>>()?;
        let parents = e.parents.iter().map(|p| entity_uid(p).ok()).collect::<Option<HashSet<_>>>()?;
        Entity::new(entity_uid(&e.uid).ok()?, attrs, parents).ok()
    };
    match direct() {
        Some(entity) => Ok(entity),
        None => Entity::from_json_value(entity_json(e), None)
            .map_err(|err| format!("entity {} is not valid Cedar data: {err}", e.uid)),
    }
}

/// A JSON value as Cedar's schemaless JSON format reads it, built directly rather than
/// through Cedar's serde parser (which tries its untagged variants one by one, building
/// an error for each: perf put it at 19 % of all CPU at 64 callers). Only the plain forms are
/// built here — booleans, 64-bit integers, strings, sets, records and `{"__entity":
/// {"type", "id"}}` references; None for anything else (`null`, other numbers, `__extn`
/// and other escapes, a bad type name), and the caller asks Cedar's parser, which gives
/// the one answer and error message for those.
fn cedar_value(v: &Value) -> Option<RestrictedExpression> {
    Some(match v {
        Value::Bool(b) => RestrictedExpression::new_bool(*b),
        Value::Number(n) => RestrictedExpression::new_long(n.as_i64()?),
        Value::String(s) => RestrictedExpression::new_string(s.clone()),
        Value::Array(a) => RestrictedExpression::new_set(a.iter().map(cedar_value).collect::<Option<Vec<_>>>()?),
        Value::Object(o) if o.keys().any(|k| k.starts_with("__")) => {
            let Some(Value::Object(e)) = o.get("__entity").filter(|_| o.len() == 1) else { return None };
            match (e.len(), e.get("type"), e.get("id")) {
                (2, Some(Value::String(ty)), Some(Value::String(id))) => {
                    let ty = EntityTypeName::from_str(ty).ok()?;
                    RestrictedExpression::new_entity_uid(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
                }
                _ => return None,
            }
        }
        Value::Object(o) => RestrictedExpression::new_record(
            o.iter().map(|(k, v)| Some((k.clone(), cedar_value(v)?))).collect::<Option<Vec<_>>>()?,
        )
        .ok()?,
        Value::Null => return None,
    })
}

/// Builds a Cedar context from a JSON record.
pub fn context(record: Value) -> Result<Context, String> {
    if let Value::Object(o) = &record
        && !o.keys().any(|k| k.starts_with("__"))
        && let Some(pairs) = o.iter().map(|(k, v)| Some((k.clone(), cedar_value(v)?))).collect::<Option<Vec<_>>>()
        && let Ok(context) = Context::from_pairs(pairs)
    {
        return Ok(context);
    }
    Context::from_json_value(record, None).map_err(|e| format!("invalid context: {e}"))
}

impl CompiledPolicies {
    /// The empty policy set: denies everything (used before any policy was put).
    pub fn empty() -> Self {
        Self { version: 0, links: 0, set: PolicySet::new(), schema: None, action_entities: Vec::new() }
    }

    /// This set with template links added (generation `links`); the message says which
    /// link does not fit (unknown template, slots that do not match, an id in use).
    pub fn with_links(&self, links: &[TemplateLink], generation: u64) -> Result<Self, String> {
        let mut out = self.clone();
        out.links = generation;
        for l in links {
            let template_id = PolicyId::new(&l.template_id);
            let template = self
                .set
                .template(&template_id)
                .ok_or_else(|| format!("no template `{}` in the active policy set", l.template_id))?;
            let mut vals = HashMap::new();
            for slot in template.slots() {
                let value = if *slot == SlotId::principal() { &l.principal } else { &l.resource };
                let uid = value.as_ref().ok_or_else(|| format!("template `{}` needs `{slot}`", l.template_id))?;
                vals.insert(slot.clone(), entity_uid(uid)?);
            }
            if vals.len() != usize::from(l.principal.is_some()) + usize::from(l.resource.is_some()) {
                return Err(format!(
                    "link `{}` fills a slot that template `{}` does not have",
                    l.link_id, l.template_id
                ));
            }
            out.set
                .link(template_id, PolicyId::new(&l.link_id), vals)
                .map_err(|e| format!("link `{}`: {e}", l.link_id))?;
        }
        Ok(out)
    }

    /// Evaluates one request against `entities` (later records win over earlier ones with
    /// the same uid, so a proposed entity can stand in for the stored one).
    pub fn evaluate(
        &self,
        principal: &Uid,
        action: &EntityUid,
        resource: &Uid,
        context: Context,
        entities: &[&EntityRecord],
    ) -> Result<Decision, String> {
        let mut unique: BTreeMap<&Uid, &EntityRecord> = BTreeMap::new();
        for e in entities {
            unique.insert(&e.uid, e);
        }
        let stored = unique
            .values()
            .map(|e| cedar_entity(e))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("stored entities are not valid Cedar data: {e}"))?;
        let cedar_entities =
            Entities::from_entities(stored.into_iter().chain(self.action_entities.iter().cloned()), None)
                .map_err(|e| format!("entities (with the schema's actions): {e}"))?;
        let request = Request::new(entity_uid(principal)?, action.clone(), entity_uid(resource)?, context, None)
            .map_err(|e| format!("invalid request: {e}"))?;
        let response = Authorizer::new().is_authorized(&request, &self.set, &cedar_entities);
        Ok(Decision {
            allowed: response.decision() == cedar_policy::Decision::Allow,
            determining_policies: response.diagnostics().reason().map(ToString::to_string).collect(),
            errors: response.diagnostics().errors().map(ToString::to_string).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_annotations() {
        let c = compile(1, "@id(\"owner-edits\") permit(principal, action, resource);", "").unwrap();
        let ids: Vec<String> = c.set.policies().map(|p| p.id().to_string()).collect();
        assert_eq!(ids, vec!["owner-edits"]);
    }

    #[test]
    fn parse_errors_carry_line_and_column() {
        let err =
            compile(1, "permit(principal, action, resource);\npermit(principal, action resource);", "").err().unwrap();
        assert!(err.0.iter().any(|m| m.starts_with("2:")), "{err:?}");
    }

    #[test]
    fn actions_short_and_full() {
        assert_eq!(action_uid("UpdateItem").unwrap().to_string(), "Action::\"UpdateItem\"");
        assert_eq!(action_uid("App::Action::\"X\"").unwrap().to_string(), "App::Action::\"X\"");
        assert!(action_uid("User::\"alice\"").is_err());
        assert!(action_uid("").is_err());
    }

    /// The direct conversion agrees with Cedar's JSON parser wherever it answers, and
    /// leaves everything else to it.
    #[test]
    fn direct_values_agree_with_cedars_json() {
        let samples = [
            json!({"b": true, "n": -7, "big": i64::MAX, "s": "x\u{0}y", "empty": {}, "set": [1, "a", [true]]}),
            json!({"owner": {"__entity": {"type": "User", "id": "alice"}}, "ns": {"__entity": {"type": "App::User", "id": ""}}}),
            json!({"rec": {"type": "User", "id": "not an entity"}, "deep": {"a": {"b": {"c": [{"d": 1}]}}}}),
            json!({"refs": [{"__entity": {"type": "Group", "id": "g"}}, {"__entity": {"type": "Group", "id": "g"}}]}),
            json!({"ip": {"__extn": {"fn": "ip", "arg": "10.0.0.1"}}, "dec": {"__extn": {"fn": "decimal", "arg": "1.5"}}}),
            json!({"float": 1.5}),
            json!({"null": null}),
            json!({"huge": u64::MAX}),
            json!({"bad": {"__entity": {"type": "not a type", "id": "x"}}}),
            json!({"extra": {"__entity": {"type": "User", "id": "x", "more": 1}}}),
            json!({"__entity": {"type": "User", "id": "x"}}),
        ];
        for v in samples {
            let slow = Context::from_json_value(v.clone(), None);
            let fast = context(v.clone());
            assert_eq!(slow.is_ok(), fast.is_ok(), "{v}");
            if let (Ok(slow), Ok(fast)) = (&slow, &fast) {
                for k in v.as_object().unwrap().keys() {
                    assert_eq!(slow.get(k), fast.get(k), "{v}: {k}");
                }
            }
            let Value::Object(attributes) = v.clone() else { unreachable!() };
            let record = EntityRecord {
                uid: Uid::new("Item", "i"),
                attributes,
                parents: vec![Uid::new("Group", "g")],
                version: 1,
            };
            let slow = Entity::from_json_value(entity_json(&record), None);
            let fast = cedar_entity(&record);
            assert_eq!(slow.is_ok(), fast.is_ok(), "{v}");
            if let (Ok(slow), Ok(fast)) = (slow, fast) {
                // (Entity's `==` compares uids only.)
                for k in v.as_object().unwrap().keys() {
                    let attr = |e: &Entity| e.attr(k).map(|r| r.ok());
                    assert_eq!(attr(&slow), attr(&fast), "{v}: {k}");
                    assert!(attr(&fast).is_some(), "{v}: {k}");
                }
                assert_eq!(slow.into_inner().2, fast.into_inner().2, "{v}: parents");
            }
        }
    }

    #[test]
    fn evaluation_is_a_value() {
        let c = compile(1, "@id(\"p\") permit(principal == User::\"a\", action, resource);", "").unwrap();
        let a = action_uid("Read").unwrap();
        let d = c.evaluate(&Uid::new("User", "a"), &a, &Uid::new("Item", "x"), Context::empty(), &[]).unwrap();
        assert!(d.allowed);
        assert_eq!(d.determining_policies, vec!["p"]);
        let d = c.evaluate(&Uid::new("User", "b"), &a, &Uid::new("Item", "x"), Context::empty(), &[]).unwrap();
        assert!(!d.allowed);
    }
}
