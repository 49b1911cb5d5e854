//! Cedar's semantics over a real server: entity tags, and entities and contexts read
//! through the active schema (entity references, decimals and ipaddrs written without
//! escapes; data that does not conform refused). Also the entity-file and policy-test
//! formats: `__entity` uids, duplicate keys, action ids taken as written.

use crate::common::*;
use lockstep::engine::{CallOptions, Caller};
use lockstep::grpc::pb;
use serde_json::{Value, json};
use tonic::Code;

const SCHEMA: &str = r#"
type Token = { sub: String, iss: String, aud: String, jti: String, iat: Long, exp: Long, scopes: Set<String>, claims: {} };
type DocAttrs = { account?: Account, price?: decimal, ip?: ipaddr, level?: Long };
type Change = {
    kind: String, changed_attributes: Set<String>, proposed: DocAttrs,
    added_parents: Set<User>, removed_parents: Set<User>,
};
entity User;
entity Account { owner: User };
entity Doc in [Account] { account: Account, price: decimal, ip: ipaddr, level: Long } tags Bool;
action ReadDoc appliesTo { principal: User, resource: Doc, context: { token: Token } };
action CreateDoc in [Lockstep::Action::"CreateEntity"] appliesTo { principal: User, resource: Doc, context: { token: Token, change: Change } };
action UpdateDoc in [Lockstep::Action::"UpdateEntity"] appliesTo { principal: User, resource: Doc, context: { token: Token, change: Change } };
namespace Lockstep { action CreateEntity, UpdateEntity; }
"#;

const POLICIES: &str = r#"
@id("all") permit(principal, action, resource);
@id("blocked") forbid(principal, action in [Action::"ReadDoc", Action::"UpdateDoc"], resource)
when { resource.hasTag("blocked") && resource.getTag("blocked") };
@id("mallory") forbid(principal, action == Action::"ReadDoc", resource)
when { resource.account.owner == User::"mallory" };
@id("dear") forbid(principal, action == Action::"ReadDoc", resource)
when { resource.price.greaterThan(decimal("100.0")) };
@id("inside") forbid(principal, action == Action::"ReadDoc", resource)
when { resource.ip.isInRange(ip("10.0.0.0/8")) };
@id("proposed-mallory") forbid(principal, action == Action::"CreateDoc", resource)
when { context.change.proposed has account && context.change.proposed.account == Account::"bad" };
"#;

fn doc(id: &str, account: &str, price: &str, ip: &str, tags: Value) -> Value {
    json!({
        "uid": {"__entity": {"type": "Doc", "id": id}},
        "attrs": {"account": {"type": "Account", "id": account}, "price": price,
                  "ip": {"fn": "ip", "arg": ip}, "level": 1},
        // The server loads the principal and the resource with their ancestors: the
        // account is a parent so that `resource.account.owner` can be read.
        "parents": [{"__entity": {"type": "Account", "id": account}}],
        "tags": tags,
    })
}

fn entities() -> Value {
    json!([
        {"uid": {"type": "User", "id": "alice"}, "attrs": {}, "parents": []},
        {"uid": {"type": "User", "id": "mallory"}, "attrs": {}, "parents": []},
        {"uid": {"type": "Account", "id": "good"}, "attrs": {"owner": {"type": "User", "id": "alice"}}, "parents": []},
        {"uid": {"type": "Account", "id": "bad"}, "attrs": {"owner": {"type": "User", "id": "mallory"}}, "parents": []},
        doc("plain", "good", "1.5", "192.168.1.1", json!({"blocked": false})),
        doc("blocked", "good", "1.5", "192.168.1.1", json!({"blocked": true})),
        doc("evil", "bad", "1.5", "192.168.1.1", json!({})),
        doc("dear", "good", "250.0", "192.168.1.1", json!({})),
        doc("inside", "good", "1.5", "10.1.2.3", json!({})),
    ])
}

fn doc_attrs(account: &str, level: Value) -> Value {
    json!({"account": {"type": "Account", "id": account}, "price": "2.0", "ip": "192.168.0.9", "level": level})
}

async fn schema_and_tags_decide(b: Backend) {
    let Some(db) = TestDb::new(b).await else { return };
    {
        let engine = operator_with_k1(&db.url).await;
        engine.put_policies(Caller::Operator, POLICIES, SCHEMA, false, CallOptions::default()).await.unwrap();
        // The import reads through the schema too: a Long written as a string is refused.
        let mut bad = entities();
        bad[4]["attrs"]["level"] = json!("5");
        let err = engine.import_entities(lockstep::cli::parse_entities(&bad.to_string()).unwrap()).await.unwrap_err();
        assert!(err.to_string().contains("level"), "{err}");
        engine.import_entities(lockstep::cli::parse_entities(&entities().to_string()).unwrap()).await.unwrap();
    }
    let s = serve(std::sync::Arc::new(db), Default::default()).await;
    let alice = token("k1", "alice");
    let reader = client(s.addr).await;
    let mut c = client(s.addr).await;
    let get = |id: &str| {
        let mut c = reader.clone();
        let req = pb::GetEntityRequest { uid: uid("Doc", id), action: "ReadDoc".into() };
        let t = alice.clone();
        async move { c.get_entity(authed(&t, req)).await.map(|r| r.into_inner().entity.unwrap()).map_err(|e| e.code()) }
    };
    let plain = get("plain").await.expect("no forbid applies");
    assert_eq!(plain.tags, st(json!({"blocked": false})), "GetEntity returns the tags");
    for id in ["blocked", "evil", "dear", "inside"] {
        assert_eq!(get(id).await.err(), Some(Code::PermissionDenied), "{id}: its forbid fires");
    }

    // Writes that do not conform to the schema are refused, naming the attribute.
    let create = |id: &str, attrs: Value, tags: Value| {
        let mut m = lockstep_create("CreateDoc", id, attrs);
        if let Some(pb::mutation::Change::Create(cr)) = &mut m.change {
            cr.tags = st(tags);
            cr.parents = vec![uid("Account", "good").unwrap()];
        }
        commit_req(vec![m])
    };
    for (attrs, tags, name) in [
        (doc_attrs("good", json!("5")), json!({}), "level"),
        (
            json!({"colour": "red", "account": {"type": "Account", "id": "good"}, "price": "1.0", "ip": "::1", "level": 1}),
            json!({}),
            "colour",
        ),
        (json!({"account": {"type": "Account", "id": "good"}, "price": "1.0", "ip": "::1"}), json!({}), "level"),
        (doc_attrs("good", json!(1)), json!({"blocked": "yes"}), "blocked"),
    ] {
        let err = c.authorize_and_commit(authed(&alice, create("new", attrs, tags))).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(err.message().contains(name), "{name}: {}", err.message());
    }
    // `change.proposed` is read through the schema too: the entity reference is one.
    let err = c.authorize_and_commit(authed(&alice, create("new", doc_attrs("bad", json!(1)), json!({})))).await;
    assert_eq!(err.unwrap_err().code(), Code::PermissionDenied, "proposed-mallory fires");
    c.authorize_and_commit(authed(&alice, create("new", doc_attrs("good", json!(1)), json!({"x": false}))))
        .await
        .unwrap();
    assert!(get("new").await.is_ok());
    // A tag set by an update (merge patch) makes the forbid fire from then on.
    let mut m = update("UpdateDoc", "Doc", "new", json!({}), None);
    if let Some(pb::mutation::Change::Update(u)) = &mut m.change {
        u.tags_merge_patch = st(json!({"blocked": true, "x": null}));
    }
    c.authorize_and_commit(authed(&alice, commit_req(vec![m]))).await.unwrap();
    assert_eq!(get("new").await.err(), Some(Code::PermissionDenied));
    let stored = s.store.read().await.unwrap().entity(&lockstep::model::Uid::new("Doc", "new")).await.unwrap();
    assert_eq!(Value::Object(stored.unwrap().tags), json!({"blocked": true}), "x removed by the patch");
    let m = update("UpdateDoc", "Doc", "new", json!({"level": 2}), None);
    let err = c.authorize_and_commit(authed(&alice, commit_req(vec![m]))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "blocked: updates forbidden too");
}

fn lockstep_create(action: &str, id: &str, attrs: Value) -> pb::Mutation {
    create(action, "Doc", id, attrs)
}

crate::on_both_backends!(schema_and_tags_decide);

fn run(text: &str) -> Result<Vec<lockstep::policytest::Outcome>, String> {
    let compiled = lockstep::policy::compile(1, POLICIES, SCHEMA).unwrap();
    lockstep::policytest::run_file("t.json", text, &compiled)
}

fn case(action: Value, resource: &str, decision: &str) -> Value {
    json!({"name": resource, "principal": {"type": "User", "id": "alice"}, "action": action,
           "resource": {"type": "Doc", "id": resource}, "context": {"token": {"sub": "alice"}},
           "decision": decision})
}

/// Policy-test files read entities as Cedar does: tags, `__entity` uids, schema types;
/// actions are taken as written.
#[test]
fn policy_tests_read_entities_as_cedar_does() {
    let file = json!({
        "entities": entities(),
        "cases": [
            case(json!("ReadDoc"), "plain", "allow"),
            case(json!("ReadDoc"), "blocked", "deny"),
            case(json!({"type": "Action", "id": "ReadDoc"}), "evil", "deny"),
            case(json!("Action::\"ReadDoc\""), "dear", "deny"),
            case(json!("ReadDoc"), "inside", "deny"),
        ],
    });
    let out = run(&file.to_string()).unwrap();
    for o in &out {
        assert!(o.passed, "{}: want {} got {} ({})", o.name, o.expected, o.got, o.note);
    }
    assert_eq!(out.len(), 5);
    // An action id with a quote is an id, taken as written.
    let file = json!({"cases": [case(json!("say \"hi\""), "plain", "allow")]});
    let out = run(&file.to_string()).unwrap();
    assert_eq!(out[0].got, "allow", "{}", out[0].note);
    // Data that does not conform to the schema is reported.
    let mut bad = entities();
    bad[4]["attrs"]["level"] = json!("5");
    let err = run(&json!({"entities": bad, "cases": []}).to_string()).err().unwrap();
    assert!(err.contains("level"), "{err}");
}

/// A key given twice in one object is refused (Cedar refuses it; serde_json keeps the last).
#[test]
fn duplicate_keys_are_refused() {
    let entity = r#"{"uid": {"type": "User", "id": "alice"}, "attrs": {"a": 1, "a": 2}, "parents": []}"#;
    let err = lockstep::cli::parse_entities(&format!("[{entity}]")).unwrap_err();
    assert!(format!("{err:#}").contains("duplicate key `a`"), "{err:#}");
    let err = run(&format!(r#"{{"entities": [{entity}], "cases": []}}"#)).err().unwrap();
    assert!(err.contains("duplicate key `a`"), "{err}");
    let err = run(r#"{"cases": [], "cases": []}"#).err().unwrap();
    assert!(err.contains("duplicate key `cases`"), "{err}");
    let ok = lockstep::cli::parse_entities(r#"[{"uid": {"__entity": {"type": "User", "id": "a"}}, "tags": {"t": 1}}]"#)
        .unwrap();
    assert_eq!(ok[0].uid, lockstep::model::Uid::new("User", "a"));
    assert_eq!(Value::Object(ok[0].tags.clone()), json!({"t": 1}));
}
