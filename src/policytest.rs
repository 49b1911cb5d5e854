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
    action: String,
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
    let value: Value = serde_json::from_str(text).map_err(|e| format!("{file}: not valid JSON: {e}"))?;
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
    let entities =
        crate::cli::parse_entities(&Value::Array(t.entities).to_string()).map_err(|e| format!("{file}: {e:#}"))?;
    for e in &entities {
        policy::check_entity(e).map_err(|m| format!("{file}: {m}"))?;
    }
    let refs: Vec<&EntityRecord> = entities.iter().collect();
    let mut out = Vec::new();
    for c in t.cases {
        let expected = c.decision.to_ascii_lowercase();
        let result = policy::action_uid(&c.action)
            .and_then(|a| Ok((a, policy::context(Value::Object(c.context.clone()))?)))
            .and_then(|(a, ctx)| policies.evaluate(&c.principal, &a, &c.resource, ctx, &refs));
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
