//! Policy tests: files of cases (entities, requests, expected decisions) run against a
//! policy set without a server, so policies are tested in CI like code.
//!
//! A test file is JSON:
//!
//! ```json
//! { "entities": [ Cedar entities JSON ],
//!   "cases": [ { "name": "owner edits", "principal": {"type": "User", "id": "alice"},
//!                "action": "UpdateItem", "resource": {"type": "Item", "id": "doc1"},
//!                "context": { "change": { … } },
//!                "decision": "allow", "determining": ["owner-manages-item"] } ] }
//! ```
//!
//! The context is taken as written: tests describe the `token` and `change` records that
//! Lockstep would set. `determining` is optional; when given it must match exactly (as a set).
//! `action` is an action id taken as written (`UpdateItem`, `say "hi"`), a full Cedar
//! action uid (`App::Action::"UpdateItem"`), or `{"type", "id"}`. Entities are Cedar's entity
//! JSON (with `tags`, and uids also as `{"__entity": …}`); with a schema, entities and
//! contexts are read through it and data that does not conform is reported. A key given
//! twice in one object is refused.

use crate::model::{EntityRecord, Uid};
use crate::policy::{self, CompiledPolicies};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    #[serde(default)]
    entities: Vec<Value>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    principal: Uid,
    action: Value,
    resource: Uid,
    #[serde(default)]
    context: serde_json::Map<String, Value>,
    decision: String,
    determining: Option<Vec<String>>,
}

/// One case's outcome.
pub struct Outcome {
    pub file: String,
    pub name: String,
    pub expected: String,
    pub got: String,
    pub determining: Vec<String>,
    pub passed: bool,
    pub note: String,
}

/// What a test file looks like, for the message about a file that is not one.
const SHAPE: &str = "a policy test file is a JSON object {\"entities\": [Cedar entities], \"cases\": [{\"name\", \
                     \"principal\": {\"type\", \"id\"}, \"action\", \"resource\": {\"type\", \"id\"}, \
                     \"context\" (optional), \"decision\": \"allow\" | \"deny\", \"determining\" (optional)}]}";

/// Runs every case of one test file's text against `policies`.
pub fn run_file(file: &str, text: &str, policies: &CompiledPolicies) -> Result<Vec<Outcome>, String> {
    let value = crate::entity_json::parse_json_strict(text).map_err(|e| format!("{file}: not valid JSON: {e:#}"))?;
    match &value {
        Value::Array(_) => {
            return Err(format!(
                "{file} is not a policy test file: it holds a JSON array (Cedar entities?), not an object; {SHAPE}"
            ));
        }
        Value::Object(o) if !o.contains_key("cases") => {
            return Err(format!("{file} is not a policy test file: it has no `cases`; {SHAPE}"));
        }
        Value::Object(_) => {}
        _ => return Err(format!("{file} is not a policy test file: it holds no JSON object; {SHAPE}")),
    }
    let t: TestFile =
        serde_json::from_value(value).map_err(|e| format!("{file}: not a valid policy test file: {e}"))?;
    let entities = t
        .entities
        .iter()
        .enumerate()
        .map(|(i, e)| crate::entity_json::entity_of_json(i, e))
        .collect::<anyhow::Result<Vec<_>>>()
        .map_err(|e| format!("{file}: {e:#}"))?;
    for e in &entities {
        policies.check_entity(e).map_err(|m| format!("{file}: {m}"))?;
    }
    let refs: Vec<&EntityRecord> = entities.iter().collect();
    let mut out = Vec::new();
    for c in t.cases {
        let expected = c.decision.to_ascii_lowercase();
        let result = action(&c.action)
            .and_then(|a| Ok((policies.context(&a, c.context.clone(), &policy::SERVER_CONTEXT)?, a)))
            .and_then(|(ctx, a)| policies.evaluate(&c.principal, &a, &c.resource, ctx, &refs));
        let (got, determining, note) = match result {
            Ok(d) => {
                (if d.allowed { "allow" } else { "deny" }.to_string(), d.determining_policies, d.errors.join("; "))
            }
            Err(e) => ("error".to_string(), Vec::new(), e),
        };
        let mut passed = got == expected;
        if let Some(want) = &c.determining {
            let (mut a, mut b) = (want.clone(), determining.clone());
            a.sort();
            b.sort();
            passed &= a == b;
        }
        out.push(Outcome { file: file.to_owned(), name: c.name, expected, got, determining, passed, note });
    }
    Ok(out)
}

/// A case's action: `{"type", "id"}`, a full Cedar action uid, or else an id of `Action`
/// taken as written (no Cedar escaping needed).
fn action(v: &Value) -> Result<cedar_policy::EntityUid, String> {
    let uid = match v {
        Value::String(s) if s.is_empty() || !s.contains('"') => return policy::action_uid(s),
        Value::String(s) => match policy::action_uid(s) {
            Ok(a) => return Ok(a),
            Err(_) => Uid::new("Action", s.clone()),
        },
        Value::Object(_) => serde_json::from_value(v.clone())
            .map_err(|_| "`action` must be a string or {\"type\", \"id\"}".to_string())?,
        _ => return Err("`action` must be a string or {\"type\", \"id\"}".into()),
    };
    if uid.ty != "Action" && !uid.ty.ends_with("::Action") {
        return Err(format!("`{}` is not an action: its type must be `Action` or end in `::Action`", uid.ty));
    }
    policy::entity_uid(&uid)
}
