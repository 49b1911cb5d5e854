//! Cedar: compiling a policy set (with its optional schema), turning domain values into
//! Cedar requests and entities, and evaluating. Pure and synchronous; no I/O here.

use crate::model::{Attributes, Decision, EntityRecord, TemplateLink, Uid};
use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet, Request,
    RestrictedExpression, Schema, SlotId, ValidationMode, Validator,
};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;

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
    /// The actions the schema declares as write actions, with the kinds of change each
    /// may carry (see `WriteKind`). Empty without a schema: then nothing may write.
    write_actions: HashMap<EntityUid, Vec<WriteKind>>,
    /// The schema's types, read once, for building entities and contexts through it.
    types: Option<Arc<SchemaTypes>>,
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

/// The largest policy text or schema text Lockstep compiles (the RPC request limit).
pub const MAX_TEXT_BYTES: usize = 1024 * 1024;
/// How deep brackets (`(`, `[`, `{`, and `<` in schemas) may nest in policy or schema text.
/// Checked before Cedar's recursive parser sees the text.
pub const MAX_TEXT_NESTING: usize = 32;
/// How deep a parsed policy's expression may nest (measured on Cedar's JSON form of the
/// policy, where each operator adds a level or two). Deeper policies — long `&&` chains,
/// nested `if`s, which need no brackets — are refused, so that evaluating a stored policy
/// can never exhaust a server thread's stack.
pub const MAX_POLICY_DEPTH: usize = 160;
/// How many operator characters (`&|+-*=!<>.`) and operator keywords (`if`, `in`, `has`,
/// `like`, `is`) one policy statement may hold: operator chains nest without brackets.
pub const MAX_POLICY_OPERATORS: usize = 2000;
/// How many hierarchy relations (`in X`, each member of `in [X, Y]`) a schema may declare:
/// Cedar computes the transitive closure of the entity type and action hierarchies, which
/// for a long chain costs time and memory quadratic in its length.
pub const MAX_SCHEMA_HIERARCHY_EDGES: usize = 300;
/// At most this many compile messages are reported (the rest are counted), each cut to
/// `MAX_COMPILE_MESSAGE_CHARS`: a hostile text must not get a reply larger than itself.
const MAX_COMPILE_MESSAGES: usize = 20;
const MAX_COMPILE_MESSAGE_CHARS: usize = 500;
/// The stack Cedar's parser and validator run on: far more than any text within the
/// bounds above needs, so a hostile text is refused, never a crash.
const COMPILER_STACK_BYTES: usize = 256 * 1024 * 1024;

/// Refuses `text` when it is too large or its brackets nest too deep, without recursion
/// (string literals and `//` comments are skipped). `what` names the text in the message.
pub fn check_text_bounds(text: &str, what: &str, brackets: &[u8]) -> Result<(), CompileErrors> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(CompileErrors(vec![format!("{what} is {} bytes; at most {MAX_TEXT_BYTES}", text.len())]));
    }
    let schema = brackets.contains(&b'<');
    let b = text.as_bytes();
    let (mut depth, mut i, mut operators) = (0usize, 0usize, 0usize);
    // Schema: hierarchy edges (`in X`, and each member of `in [X, Y]`), and the bracket
    // depth of the `in [` list being read.
    let (mut edges, mut in_list, mut after_in) = (0usize, None::<usize>, false);
    while i < b.len() {
        if !schema && operators > MAX_POLICY_OPERATORS {
            let (line, col) = line_col(text, i);
            return Err(CompileErrors(vec![format!(
                "{line}:{col}: a policy holds more than {MAX_POLICY_OPERATORS} operators; split it into several policies"
            )]));
        }
        if schema && edges > MAX_SCHEMA_HIERARCHY_EDGES {
            let (line, col) = line_col(text, i);
            return Err(CompileErrors(vec![format!(
                "{line}:{col}: the schema declares more than {MAX_SCHEMA_HIERARCHY_EDGES} `in` relations \
                 (entity type and action hierarchies); at most {MAX_SCHEMA_HIERARCHY_EDGES}"
            )]));
        }
        if after_in && !b[i].is_ascii_whitespace() {
            after_in = false;
            if b[i] == b'[' {
                in_list = Some(depth + 1);
            }
        }
        match b[i] {
            b';' if depth == 0 => operators = 0,
            b'&' | b'|' | b'+' | b'-' | b'*' | b'=' | b'!' | b'<' | b'>' | b'.' | b'[' if !schema => operators += 1,
            b',' if in_list == Some(depth) => edges += 1,
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i + 1 < b.len() && (b[i + 1].is_ascii_alphanumeric() || b[i + 1] == b'_') {
                    i += 1;
                }
                let word = &b[start..=i];
                if !schema && matches!(word, b"if" | b"in" | b"has" | b"like" | b"is") {
                    operators += 1;
                }
                if schema && word == b"in" {
                    edges += 1;
                    after_in = true;
                }
            }
            _ => {}
        }
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            c if brackets.contains(&c) => {
                depth += 1;
                if depth > MAX_TEXT_NESTING {
                    let (line, col) = line_col(text, i);
                    return Err(CompileErrors(vec![format!(
                        "{line}:{col}: {what} nests brackets more than {MAX_TEXT_NESTING} deep; simplify the expression"
                    )]));
                }
            }
            b')' | b']' | b'}' => {
                if in_list == Some(depth) {
                    in_list = None;
                }
                depth = depth.saturating_sub(1);
            }
            b'>' if brackets.contains(&b'<') => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// The depth of a JSON value, without recursion.
fn json_depth(v: &Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|x| (x, d + 1))),
            Value::Object(o) => stack.extend(o.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    max
}

/// Parses `policies` (naming each policy by its `@id("…")` annotation when it has one),
/// and when `schema` is not empty parses it and validates the policies strictly.
///
/// Untrusted text: its size and bracket nesting are bounded before Cedar parses it, the
/// parser and validator run on a thread with a large stack, and parsed policies nested
/// deeper than `MAX_POLICY_DEPTH` are refused (see the constants above).
pub fn compile(version: u64, policies: &str, schema: &str) -> Result<CompiledPolicies, CompileErrors> {
    check_text_bounds(policies, "policy text", b"([{")?;
    check_text_bounds(schema, "schema", b"([{<")?;
    let compiled = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("cedar-compile".into())
            .stack_size(COMPILER_STACK_BYTES)
            .spawn_scoped(scope, || compile_bounded(version, policies, schema))
            .map_err(|e| CompileErrors(vec![format!("cannot start the policy compiler: {e}")]))?
            .join()
            .unwrap_or_else(|_| Err(CompileErrors(vec!["the policy compiler failed on this text".into()])))
    });
    compiled.map_err(|CompileErrors(mut messages)| {
        let more = messages.len().saturating_sub(MAX_COMPILE_MESSAGES);
        messages.truncate(MAX_COMPILE_MESSAGES);
        for m in &mut messages {
            if let Some((at, _)) = m.char_indices().nth(MAX_COMPILE_MESSAGE_CHARS) {
                m.truncate(at);
                m.push('…');
            }
        }
        if more > 0 {
            messages.push(format!("… and {more} more"));
        }
        CompileErrors(messages)
    })
}

/// `compile` after the text bounds, on the compiler's thread.
fn compile_bounded(version: u64, policies: &str, schema: &str) -> Result<CompiledPolicies, CompileErrors> {
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
    for t in set.templates() {
        let depth = t.to_json().map(|j| json_depth(&j)).unwrap_or(usize::MAX);
        if depth > MAX_POLICY_DEPTH {
            errors.push(format!("template `{}` nests {depth} levels deep; at most {MAX_POLICY_DEPTH}", t.id()));
        }
    }
    for p in set.policies() {
        let depth = p.to_json().map(|j| json_depth(&j)).unwrap_or(usize::MAX);
        if depth > MAX_POLICY_DEPTH {
            errors.push(format!("policy `{}` nests {depth} levels deep; at most {MAX_POLICY_DEPTH}", p.id()));
        }
    }
    if !errors.is_empty() {
        return Err(CompileErrors(errors));
    }
    let mut write_actions: HashMap<EntityUid, Vec<WriteKind>> = HashMap::new();
    let (schema, action_entities, types) = if schema.trim().is_empty() {
        (None, Vec::new(), None)
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
        let actions = s.action_entities().map_err(|e| CompileErrors(vec![format!("schema actions: {e}")]))?;
        for kind in WriteKind::ALL {
            let group = kind.group();
            for a in actions.iter().filter(|a| a.uid() != group && actions.is_ancestor_of(&group, &a.uid())) {
                write_actions.entry(a.uid()).or_default().push(kind);
            }
        }
        let types = SchemaTypes::read(schema);
        (Some(s), actions.iter().cloned().collect(), Some(Arc::new(types)))
    };
    Ok(CompiledPolicies { version, links: 0, set, schema, action_entities, write_actions, types })
}

/// The kinds of change a mutation makes. An action may carry a mutation of a kind only
/// when the schema declares it a member (directly or through groups) of that kind's
/// action group — `Lockstep::Action::"CreateEntity"`, `"UpdateEntity"` or `"DeleteEntity"`
/// — so a caller cannot pick a read action, or an update action, to judge a delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    Create,
    Update,
    Delete,
}

impl WriteKind {
    pub const ALL: [WriteKind; 3] = [WriteKind::Create, WriteKind::Update, WriteKind::Delete];

    /// The action group whose members may carry this kind of change.
    pub fn group_name(self) -> &'static str {
        match self {
            WriteKind::Create => "Lockstep::Action::\"CreateEntity\"",
            WriteKind::Update => "Lockstep::Action::\"UpdateEntity\"",
            WriteKind::Delete => "Lockstep::Action::\"DeleteEntity\"",
        }
    }

    fn group(self) -> EntityUid {
        let id = match self {
            WriteKind::Create => "CreateEntity",
            WriteKind::Update => "UpdateEntity",
            WriteKind::Delete => "DeleteEntity",
        };
        #[allow(clippy::expect_used)]
        let ty = EntityTypeName::from_str("Lockstep::Action").expect("INVARIANT: a valid type name");
        EntityUid::from_type_name_and_id(ty, EntityId::new(id))
    }
}

/// A Cedar entity uid from a domain uid; the message says what is wrong with it.
pub fn entity_uid(uid: &Uid) -> Result<EntityUid, String> {
    let ty = type_name(&uid.ty).ok_or_else(|| format!("invalid Cedar entity type `{}`", uid.ty))?;
    Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(&uid.id)))
}

/// Cedar's reading of an entity type name, remembered by each thread: every decision names
/// the same few types several times, and Cedar's parser took a twentieth of a write's CPU
/// in the server. Only names Cedar accepted are kept, at most `TYPE_NAMES` per thread (a
/// caller inventing names only makes the thread forget and parse again).
fn type_name(ty: &str) -> Option<EntityTypeName> {
    const TYPE_NAMES: usize = 256;
    thread_local! {
        static NAMES: std::cell::RefCell<HashMap<Box<str>, EntityTypeName>> = std::cell::RefCell::default();
    }
    NAMES.with(|names| {
        if let Some(n) = names.borrow().get(ty) {
            return Some(n.clone());
        }
        let n = EntityTypeName::from_str(ty).ok()?;
        let mut names = names.borrow_mut();
        if names.len() >= TYPE_NAMES {
            names.clear();
        }
        names.insert(ty.into(), n.clone());
        Some(n)
    })
}

/// The longest action a request may name (an id, or a full uid with its namespace).
pub const MAX_ACTION_BYTES: usize = 1024;

/// An action as callers write it: `UpdateItem` means `Action::"UpdateItem"`; a full uid
/// (`App::Action::"UpdateItem"`) is taken as written.
pub fn action_uid(action: &str) -> Result<EntityUid, String> {
    if action.is_empty() {
        return Err("action is empty: name a Cedar action, e.g. `UpdateItem`".into());
    }
    if action.len() > MAX_ACTION_BYTES {
        return Err(format!("action is {} bytes; at most {MAX_ACTION_BYTES}", action.len()));
    }
    if action.contains('\0') {
        return Err("action must not contain NUL".into());
    }
    if action.contains('"') {
        let uid = EntityUid::from_str(action).map_err(|_| format!("invalid Cedar action uid `{action}`"))?;
        let ty = uid.type_name().to_string();
        if ty != "Action" && !ty.ends_with("::Action") {
            return Err(format!("`{action}` is not an action: its type must be `Action` or end in `::Action`"));
        }
        return Ok(uid);
    }
    let ty = type_name("Action").ok_or("the type name `Action` is refused by Cedar")?;
    Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(action)))
}

/// The entity in Cedar's JSON entity format.
pub fn entity_json(e: &EntityRecord) -> Value {
    let mut v = json!({
        "uid": { "type": e.uid.ty, "id": e.uid.id },
        "attrs": e.attributes,
        "parents": e.parents,
    });
    if !e.tags.is_empty() {
        v["tags"] = Value::Object(e.tags.clone());
    }
    v
}

/// The entity built directly from its JSON values (`types`: through the schema's types),
/// None where the direct path does not answer and Cedar's own parser must.
fn direct_entity(e: &EntityRecord, types: Option<&SchemaTypes>) -> Option<Entity> {
    let uid = entity_uid(&e.uid).ok()?;
    let parents = e.parents.iter().map(|p| entity_uid(p).ok()).collect::<Option<HashSet<_>>>()?;
    let (attrs, tags) = match types {
        None => {
            let plain = |m: &serde_json::Map<String, Value>| {
                m.iter().map(|(k, v)| Some((k.clone(), cedar_value(v)?))).collect::<Option<Vec<_>>>()
            };
            (plain(&e.attributes)?, plain(&e.tags)?)
        }
        Some(t) => {
            let (Ty::Record(shape, open), tags_ty) = t.entities.get(&e.uid.ty)? else { return None };
            let attrs = typed_record(&e.attributes, shape, *open, false)?;
            let tags = match (e.tags.is_empty(), tags_ty) {
                (true, _) => Vec::new(),
                (false, None) => return None,
                (false, Some(ty)) => {
                    e.tags.iter().map(|(k, v)| Some((k.clone(), typed(v, ty, false)?))).collect::<Option<Vec<_>>>()?
                }
            };
            (attrs, tags)
        }
    };
    Entity::new_with_tags(uid, attrs, parents, tags).ok()
}

/// The entity as Cedar's JSON parser reads it (through `schema` when given): the one
/// answer, and the error message, wherever the direct path does not answer.
fn parsed_entity(e: &EntityRecord, schema: Option<&Schema>) -> Result<Entity, String> {
    Entity::from_json_value(entity_json(e), schema)
        .map_err(|err| format!("entity {} is not valid Cedar data: {}", e.uid, chain(&err)))
}

/// An error with its sources, `outer: inner: …` (Cedar puts the attribute in the inner ones).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        next = s.source();
    }
    out
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
                    let ty = type_name(ty)?;
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

/// A schema type, as far as reading JSON values through it needs.
#[derive(Debug, Clone, PartialEq)]
enum Ty {
    Bool,
    Long,
    Str,
    Set(Box<Ty>),
    /// Attributes (type, required) and whether others are allowed.
    Record(BTreeMap<String, (Ty, bool)>, bool),
    /// A reference to an entity of this (fully qualified) type.
    Entity(String),
    /// `decimal`, `ipaddr`, `datetime`, `duration`.
    Ext(String),
    /// Anything else: left to Cedar's parser.
    Unknown,
}

/// What in a Cedar schema (text) disagrees with a mapping of entity types onto tables:
/// mapped types the schema does not declare, mapped attributes it does not declare or
/// types differently, attributes it requires that nothing maps, parents it does not
/// allow. Each message names the type, the attribute and the column. No schema: nothing.
pub fn mapping_problems(schema: &str, mapping: &crate::mapping::Mapping) -> Vec<String> {
    use crate::mapping::ColumnType as C;
    if schema.trim().is_empty() || mapping.is_empty() {
        return Vec::new();
    }
    let Ok((Value::Object(namespaces), _)) = cedar_policy::schema_str_to_json_with_resolved_types(schema) else {
        return vec!["the schema cannot be read to check the mapping against it".into()];
    };
    let types = SchemaTypes::read(schema);
    let q = |ns: &str, n: &str| if ns.is_empty() { n.to_string() } else { format!("{ns}::{n}") };
    let mut member_of: HashMap<String, Vec<String>> = HashMap::new();
    for (ns, frag) in &namespaces {
        if let Some(Value::Object(es)) = frag.get("entityTypes") {
            for (n, e) in es {
                let parents = e.get("memberOfTypes").and_then(Value::as_array).cloned().unwrap_or_default();
                let parents = parents
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|p| if p.contains("::") || ns.is_empty() { p.to_string() } else { q(ns, p) })
                    .collect();
                member_of.insert(q(ns, n), parents);
            }
        }
    }
    let mut out = Vec::new();
    for tm in mapping.types() {
        let et = &tm.entity_type;
        let Some((Ty::Record(attrs, _), _)) = types.entities.get(et) else {
            out.push(format!("entity type {et} is mapped (table {}) but the schema does not declare it", tm.table));
            continue;
        };
        for (a, m) in &tm.attributes {
            let col = format!("{}.{}", tm.table, m.column);
            let Some((ty, _)) = attrs.get(a) else {
                out.push(format!(
                    "entity type {et}: attribute `{a}` is mapped (column {col}) but the schema does not declare it"
                ));
                continue;
            };
            let fits = match (m.ty, ty) {
                (_, Ty::Unknown) | (C::Json, _) => true,
                (C::Text | C::TimestampText, Ty::Str) | (C::Integer, Ty::Long) | (C::Boolean, Ty::Bool) => true,
                (C::Datetime, Ty::Ext(x)) => x == "datetime",
                (C::TextSet, Ty::Set(e)) => **e == Ty::Str,
                (C::IntegerSet, Ty::Set(e)) => **e == Ty::Long,
                (C::Entity, Ty::Entity(t)) => Some(t.as_str()) == m.entity_type.as_deref(),
                _ => false,
            };
            if !fits {
                out.push(format!(
                    "entity type {et}: attribute `{a}` (column {col}, mapped as {}{}) is typed {} in the schema",
                    m.ty.name(),
                    m.entity_type.as_deref().map(|t| format!(" {t}")).unwrap_or_default(),
                    ty_name(ty)
                ));
            }
        }
        for (a, (_, required)) in attrs {
            if *required && !tm.attributes.iter().any(|(n, _)| n == a) {
                out.push(format!(
                    "entity type {et}: the schema requires attribute `{a}`, which the mapping does not map to a column of {}",
                    tm.table
                ));
            }
        }
        let allowed = member_of.get(et).cloned().unwrap_or_default();
        for (p, _) in &tm.parents {
            if !allowed.contains(p) {
                out.push(format!(
                    "entity type {et}: parents of type {p} are mapped but the schema does not allow {et} in {p}"
                ));
            }
        }
    }
    out
}

/// A schema type as the messages above name it.
fn ty_name(t: &Ty) -> String {
    match t {
        Ty::Bool => "Bool".into(),
        Ty::Long => "Long".into(),
        Ty::Str => "String".into(),
        Ty::Set(e) => format!("Set<{}>", ty_name(e)),
        Ty::Record(..) => "a record".into(),
        Ty::Entity(n) => format!("entity {n}"),
        Ty::Ext(n) => n.clone(),
        Ty::Unknown => "unknown".into(),
    }
}

/// The schema's types, read once per compile: each entity type's attributes and tags, and
/// each action's context (keyed by the action's uid).
#[derive(Debug, Default)]
struct SchemaTypes {
    entities: HashMap<String, (Ty, Option<Ty>)>,
    contexts: HashMap<EntityUid, Ty>,
}

impl SchemaTypes {
    /// The types of a Cedar schema that compiles. When Cedar cannot resolve it to JSON
    /// the result is empty, so every entity goes through Cedar's parser (correct, slower).
    fn read(schema: &str) -> Self {
        let Ok((Value::Object(namespaces), _)) = cedar_policy::schema_str_to_json_with_resolved_types(schema) else {
            return Self::default();
        };
        let q = |ns: &str, n: &str| if ns.is_empty() { n.to_string() } else { format!("{ns}::{n}") };
        let mut common = HashMap::new();
        for (ns, frag) in &namespaces {
            if let Some(Value::Object(c)) = frag.get("commonTypes") {
                for (n, t) in c {
                    common.insert(q(ns, n), t.clone());
                }
            }
        }
        let empty = || Ty::Record(BTreeMap::new(), false);
        let mut out = Self::default();
        for (ns, frag) in &namespaces {
            if let Some(Value::Object(es)) = frag.get("entityTypes") {
                for (n, e) in es {
                    let shape = e.get("shape").map_or_else(empty, |s| schema_ty(s, &common, 0));
                    let tags = e.get("tags").map(|t| schema_ty(t, &common, 0));
                    out.entities.insert(q(ns, n), (shape, tags));
                }
            }
            let Ok(action_ty) = EntityTypeName::from_str(&q(ns, "Action")) else { continue };
            if let Some(Value::Object(acts)) = frag.get("actions") {
                for (n, a) in acts {
                    let ctx = a.get("appliesTo").and_then(|x| x.get("context"));
                    let ctx = ctx.map_or_else(empty, |c| schema_ty(c, &common, 0));
                    let uid = EntityUid::from_type_name_and_id(action_ty.clone(), EntityId::new(n));
                    out.contexts.insert(uid, ctx);
                }
            }
        }
        out
    }
}

/// A type of Cedar's JSON schema format with resolved names (common types looked up).
fn schema_ty(v: &Value, common: &HashMap<String, Value>, depth: usize) -> Ty {
    if depth > 64 {
        return Ty::Unknown;
    }
    let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    let builtin = |n: &str| n.strip_prefix("__cedar::").unwrap_or(n).to_string();
    match builtin(field("type")).as_str() {
        "String" => Ty::Str,
        "Long" => Ty::Long,
        "Boolean" | "Bool" => Ty::Bool,
        "Set" => v.get("element").map_or(Ty::Unknown, |e| Ty::Set(Box::new(schema_ty(e, common, depth + 1)))),
        "Record" => {
            let attrs = match v.get("attributes") {
                Some(Value::Object(a)) => a
                    .iter()
                    .map(|(k, a)| {
                        let required = a.get("required").and_then(Value::as_bool).unwrap_or(true);
                        (k.clone(), (schema_ty(a, common, depth + 1), required))
                    })
                    .collect(),
                _ => BTreeMap::new(),
            };
            Ty::Record(attrs, v.get("additionalAttributes").and_then(Value::as_bool).unwrap_or(false))
        }
        "Entity" => Ty::Entity(field("name").to_string()),
        "Extension" => Ty::Ext(builtin(field("name"))),
        "EntityOrCommon" => match common.get(field("name")) {
            Some(c) => schema_ty(c, common, depth + 1),
            None => Ty::Entity(field("name").to_string()),
        },
        other => match common.get(field("type")) {
            Some(c) => schema_ty(c, common, depth + 1),
            None if matches!(other, "decimal" | "ipaddr" | "datetime" | "duration") => Ty::Ext(other.to_string()),
            None => Ty::Unknown,
        },
    }
}

/// A JSON value read through a schema type, as Cedar's schema-based parser reads it: the
/// `__entity` / `__extn` escapes may be left out (`{"type", "id"}` is an entity where the
/// schema says so, `"1.5"` a decimal). None when the value does not fit the type (or takes
/// a form not built here); the caller then asks Cedar (entities) or refuses (context).
/// With `project`, attributes the schema does not declare, or that do not fit, are left
/// out instead (for the records Lockstep itself sets, e.g. `token.claims`).
fn typed(v: &Value, ty: &Ty, project: bool) -> Option<RestrictedExpression> {
    Some(match (ty, v) {
        (Ty::Bool, Value::Bool(b)) => RestrictedExpression::new_bool(*b),
        (Ty::Long, Value::Number(n)) => RestrictedExpression::new_long(n.as_i64()?),
        (Ty::Str, Value::String(s)) => RestrictedExpression::new_string(s.clone()),
        (Ty::Set(t), Value::Array(a)) => {
            RestrictedExpression::new_set(a.iter().map(|x| typed(x, t, project)).collect::<Option<Vec<_>>>()?)
        }
        (Ty::Record(attrs, open), Value::Object(o)) => {
            RestrictedExpression::new_record(typed_record(o, attrs, *open, project)?).ok()?
        }
        (Ty::Entity(name), Value::Object(o)) => {
            let inner = match o.get("__entity") {
                Some(Value::Object(e)) if o.len() == 1 => e,
                _ => o,
            };
            match (inner.len(), inner.get("type"), inner.get("id")) {
                (2, Some(Value::String(t)), Some(Value::String(id))) if t == name => {
                    let t = type_name(t)?;
                    RestrictedExpression::new_entity_uid(EntityUid::from_type_name_and_id(t, EntityId::new(id)))
                }
                _ => return None,
            }
        }
        (Ty::Ext(name), v) => {
            let (ctor, make): (&str, fn(&str) -> RestrictedExpression) = match name.as_str() {
                "decimal" => ("decimal", |s| RestrictedExpression::new_decimal(s)),
                "ipaddr" => ("ip", |s| RestrictedExpression::new_ip(s)),
                "datetime" => ("datetime", |s| RestrictedExpression::new_datetime(s)),
                "duration" => ("duration", |s| RestrictedExpression::new_duration(s)),
                _ => return None,
            };
            let arg = match v {
                Value::String(s) => s,
                Value::Object(o) => {
                    let inner = match o.get("__extn") {
                        Some(Value::Object(e)) if o.len() == 1 => e,
                        _ => o,
                    };
                    match (inner.len(), inner.get("fn"), inner.get("arg")) {
                        (2, Some(Value::String(f)), Some(Value::String(a))) if f == ctor => a,
                        _ => return None,
                    }
                }
                _ => return None,
            };
            make(arg)
        }
        _ => return None,
    })
}

/// A JSON record read through a record type (see `typed`): every required attribute
/// present (unless `project`) and no undeclared ones (unless the type allows them).
fn typed_record(
    o: &serde_json::Map<String, Value>,
    attrs: &BTreeMap<String, (Ty, bool)>,
    open: bool,
    project: bool,
) -> Option<Vec<(String, RestrictedExpression)>> {
    if !project && attrs.iter().any(|(k, (_, required))| *required && !o.contains_key(k)) {
        return None;
    }
    let mut out = Vec::with_capacity(o.len());
    for (k, v) in o {
        let value = match attrs.get(k) {
            Some((t, _)) => typed(v, t, project),
            None if open => cedar_value(v),
            None => None,
        };
        match value {
            Some(x) => out.push((k.clone(), x)),
            None if project => {}
            None => return None,
        }
    }
    Some(out)
}

/// Builds a Cedar context from a JSON record, without a schema.
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

/// The longest parent chain handed to Cedar. Its transitive closure recurses once per
/// level, on a worker's 2 MiB stack: a chain of 3,000 groups overflowed it and aborted the
/// process. A longer chain is refused (the call fails, closed), never evaluated.
pub const MAX_CHAIN: usize = 200;

/// Whether every parent chain among `records` is at most `max` entities long: at most
/// `max` records, or else the longest path (found without recursion) within it and no
/// cycle (a cycle through more than `max` entities is refused too).
fn chains_within(records: &[&EntityRecord], max: usize) -> bool {
    if records.len() <= max {
        return true;
    }
    let index: HashMap<&Uid, usize> = records.iter().enumerate().map(|(i, e)| (&e.uid, i)).collect();
    // 0: not visited; 1: on the path; 2: done, with its chain length in `depth`.
    let (mut state, mut depth) = (vec![0u8; records.len()], vec![0usize; records.len()]);
    for start in 0..records.len() {
        if state[start] != 0 {
            continue;
        }
        let mut stack = vec![(start, 0usize)];
        state[start] = 1;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            let parents = &records[node].parents;
            if let Some(p) = parents.get(*next) {
                *next += 1;
                let Some(&pi) = index.get(p) else { continue };
                match state[pi] {
                    0 => {
                        state[pi] = 1;
                        stack.push((pi, 0));
                    }
                    1 => return false,
                    _ => {}
                }
            } else {
                let d = 1 + parents.iter().filter_map(|p| index.get(p)).map(|&pi| depth[pi]).max().unwrap_or(0);
                if d > max {
                    return false;
                }
                depth[node] = d;
                state[node] = 2;
                stack.pop();
            }
        }
    }
    true
}

/// Lockstep's own context records (`token`, `change`): read through the schema with
/// undeclared parts left out, never refused.
pub const SERVER_CONTEXT: [&str; 2] = ["token", "change"];

impl CompiledPolicies {
    /// The Cedar context of a request for `action`. When the schema declares the action,
    /// values are read through its context type (entity references and extension values
    /// without escapes), an attribute of the wrong type or one it does not declare is
    /// refused naming it, and the `server` records are read with what the schema does not
    /// declare left out. Without a schema (or for an action it does not declare), as written.
    pub fn context(&self, action: &EntityUid, record: Attributes, server: &[&str]) -> Result<Context, String> {
        let declared = self.types.as_ref().and_then(|t| t.contexts.get(action));
        let Some(Ty::Record(attrs, open)) = declared else { return context(Value::Object(record)) };
        let mut pairs = Vec::with_capacity(record.len());
        for (k, v) in &record {
            let project = server.contains(&k.as_str());
            let value = match attrs.get(k) {
                Some((ty, _)) => typed(v, ty, project),
                None if *open => cedar_value(v),
                None if project => continue,
                None => return Err(format!("context attribute `{k}` is not declared by the schema for {action}")),
            };
            match value {
                Some(x) => pairs.push((k.clone(), x)),
                None if project => {}
                None => {
                    return Err(format!("context attribute `{k}` does not conform to the schema's type for {action}"));
                }
            }
        }
        Context::from_pairs(pairs).map_err(|e| format!("invalid context: {e}"))
    }

    /// Checks that an entity is valid Cedar data (types, entity references, extension
    /// values) and, with a schema, conforms to it; the message names what is wrong.
    pub fn check_entity(&self, e: &EntityRecord) -> Result<(), String> {
        entity_uid(&e.uid)?;
        for p in &e.parents {
            entity_uid(p)?;
        }
        let Some(schema) = &self.schema else {
            return direct_entity(e, None).map_or_else(|| parsed_entity(e, None).map(|_| ()), |_| Ok(()));
        };
        let conforms = |entity: Entity| {
            Entities::from_entities([entity], Some(schema))
                .map(|_| ())
                .map_err(|err| format!("entity {} does not conform to the schema: {}", e.uid, chain(&err)))
        };
        match direct_entity(e, self.types.as_deref()).map(conforms) {
            Some(Ok(())) => Ok(()),
            _ => conforms(parsed_entity(e, Some(schema))?),
        }
    }

    /// Cedar's entities for one evaluation: built directly where that answers, and when
    /// the schema does not accept those, read again by Cedar's parser, whose answer counts.
    fn cedar_entities(&self, records: &[&EntityRecord]) -> Result<Entities, String> {
        if !chains_within(records, MAX_CHAIN) {
            return Err(format!(
                "the entities' parent chains are longer than {MAX_CHAIN} levels (or cycle through more than \
                 {MAX_CHAIN} entities): refused, not evaluated"
            ));
        }
        let schema = self.schema.as_ref();
        let types = self.types.as_deref();
        let mut direct = true;
        let built = records
            .iter()
            .map(|e| match direct_entity(e, types) {
                Some(entity) => Ok(entity),
                None => {
                    direct = false;
                    parsed_entity(e, schema)
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("stored entities are not valid Cedar data: {e}"))?;
        let Some(schema) = schema else {
            return Entities::from_entities(built.into_iter().chain(self.action_entities.iter().cloned()), None)
                .map_err(|e| format!("entities (with the schema's actions): {e}"));
        };
        match Entities::from_entities(built, Some(schema)) {
            Ok(entities) => Ok(entities),
            Err(_) if direct => {
                let parsed = records
                    .iter()
                    .map(|e| parsed_entity(e, Some(schema)))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("stored entities do not conform to the schema: {e}"))?;
                Entities::from_entities(parsed, Some(schema))
                    .map_err(|e| format!("stored entities do not conform to the schema: {}", chain(&e)))
            }
            Err(e) => Err(format!("stored entities do not conform to the schema: {}", chain(&e))),
        }
    }

    /// The empty policy set: denies everything (used before any policy was put).
    pub fn empty() -> Self {
        Self {
            version: 0,
            links: 0,
            set: PolicySet::new(),
            schema: None,
            action_entities: Vec::new(),
            write_actions: HashMap::new(),
            types: None,
        }
    }

    /// Whether `action` is declared to carry a change of `kind` (see `WriteKind`).
    pub fn may_write(&self, action: &EntityUid, kind: WriteKind) -> bool {
        self.write_actions.get(action).is_some_and(|k| k.contains(&kind))
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
        let span = if crate::telemetry::in_traced_call() {
            tracing::info_span!(
                target: crate::telemetry::SPANS,
                "policy.evaluate",
                entities = entities.len(),
                decision = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        }
        .entered();
        let mut unique: BTreeMap<&Uid, &EntityRecord> = BTreeMap::new();
        for e in entities {
            unique.insert(&e.uid, e);
        }
        let cedar_entities = self.cedar_entities(&unique.into_values().collect::<Vec<_>>())?;
        let request = Request::new(entity_uid(principal)?, action.clone(), entity_uid(resource)?, context, None)
            .map_err(|e| format!("invalid request: {e}"))?;
        let response = Authorizer::new().is_authorized(&request, &self.set, &cedar_entities);
        let decision = self.fail_closed(&response);
        span.record("decision", if decision.allowed { "allow" } else { "deny" });
        Ok(decision)
    }

    /// Cedar skips a policy whose evaluation errors. For a `permit` that is safe (it does
    /// not allow), but a skipped `forbid` would let a permit win — e.g. a forbid reading
    /// an entity outside the loaded slice. So an error in any forbid denies, and the
    /// erroring forbids are the determining policies.
    fn fail_closed(&self, response: &cedar_policy::Response) -> Decision {
        let errors: Vec<String> = response.diagnostics().errors().map(ToString::to_string).collect();
        let failed_forbids: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|cedar_policy::AuthorizationError::PolicyEvaluationError(e)| e.policy_id())
            .filter(|id| self.set.policy(id).is_some_and(|p| p.effect() == cedar_policy::Effect::Forbid))
            .map(ToString::to_string)
            .collect();
        if !failed_forbids.is_empty() {
            return Decision { allowed: false, determining_policies: failed_forbids, errors };
        }
        Decision {
            allowed: response.decision() == cedar_policy::Decision::Allow,
            determining_policies: response.diagnostics().reason().map(ToString::to_string).collect(),
            errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parent chain longer than `MAX_CHAIN` is refused before Cedar sees it (Cedar's
    /// recursion overflowed a worker's 2 MiB stack at 3,000 levels); one within it, and a
    /// wide graph of more entities, are evaluated. Run on a 2 MiB stack, as a worker's.
    #[test]
    fn long_parent_chains_are_refused_not_evaluated() {
        let chain = |n: usize| -> Vec<EntityRecord> {
            (0..n)
                .map(|i| EntityRecord {
                    uid: Uid::new("Group", format!("g{i}")),
                    attributes: Default::default(),
                    parents: if i + 1 < n { vec![Uid::new("Group", format!("g{}", i + 1))] } else { vec![] },
                    version: 1,
                    tags: Default::default(),
                })
                .collect()
        };
        let run = move || {
            let c = compile(1, "permit(principal, action, resource);", "").unwrap();
            let eval = |records: &[EntityRecord]| {
                let refs: Vec<&EntityRecord> = records.iter().collect();
                let ctx = Context::empty();
                c.evaluate(&records[0].uid, &action_uid("X").unwrap(), &records[0].uid, ctx, &refs)
            };
            let long = eval(&chain(5000)).unwrap_err();
            assert!(long.contains(&format!("longer than {MAX_CHAIN} levels")), "{long}");
            assert!(eval(&chain(MAX_CHAIN)).unwrap().allowed);
            let mut wide = chain(2);
            for i in 0..1500 {
                let g = Uid::new("Group", format!("w{i}"));
                wide[0].parents.push(g.clone());
                wide.push(EntityRecord {
                    uid: g,
                    attributes: Default::default(),
                    parents: vec![],
                    version: 1,
                    tags: Default::default(),
                });
            }
            assert!(eval(&wide).unwrap().allowed);
            let mut cycle = chain(1500);
            cycle[1499].parents.push(Uid::new("Group", "g0"));
            assert!(eval(&cycle).is_err());
        };
        std::thread::Builder::new().stack_size(2 * 1024 * 1024).spawn(run).unwrap().join().unwrap();
    }

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
                attributes: attributes.clone(),
                parents: vec![Uid::new("Group", "g")],
                version: 1,
                tags: attributes,
            };
            let slow = Entity::from_json_value(entity_json(&record), None);
            let fast = direct_entity(&record, None).ok_or(()).or_else(|_| parsed_entity(&record, None));
            assert_eq!(slow.is_ok(), fast.is_ok(), "{v}");
            if let (Ok(slow), Ok(fast)) = (slow, fast) {
                // (Entity's `==` compares uids only.)
                for k in v.as_object().unwrap().keys() {
                    let attr = |e: &Entity| e.attr(k).map(|r| r.ok());
                    assert_eq!(attr(&slow), attr(&fast), "{v}: {k}");
                    assert!(attr(&fast).is_some(), "{v}: {k}");
                    let tag = |e: &Entity| e.tag(k).map(|r| r.ok());
                    assert_eq!(tag(&slow), tag(&fast), "{v}: tag {k}");
                    assert!(tag(&fast).is_some(), "{v}: tag {k}");
                }
                assert_eq!(slow.into_inner().2, fast.into_inner().2, "{v}: parents");
            }
        }
    }

    /// Texts that once aborted the process (stack overflow in Cedar's recursive parser)
    /// are refused with a message, on a thread with a server worker's small stack.
    #[test]
    fn deep_texts_are_refused_not_crashes() {
        let deep_parens =
            format!("permit(principal,action,resource) when {{ {}true{} }};", "(".repeat(150), ")".repeat(150));
        let deep_if = format!(
            "permit(principal,action,resource) when {{ {} true {} }};",
            "if true then ".repeat(400),
            " else false".repeat(400)
        );
        let long_and = format!("permit(principal,action,resource) when {{ {} true }};", "true && ".repeat(20_000));
        let neg = format!("permit(principal,action,resource) when {{ {}1 == 1 }};", "-".repeat(5000));
        let schema_deep = format!("entity A {{ a: {}String{} }};", "{ a: ".repeat(1000), " }".repeat(1000));
        let schema_sets = format!("entity A {{ a: {}String{} }};", "Set<".repeat(1000), ">".repeat(1000));
        let schema_chain: String =
            (0..2000).map(|i| format!("entity E{i} in [E{}];\n", i + 1)).collect::<String>() + "entity E2000;";
        let action_chain: String =
            (0..2000).map(|i| format!("action \"a{i}\" in [\"a{}\"];\n", i + 1)).collect::<String>()
                + "action \"a2000\";";
        let wide_list = format!("entity A in [{}];", (0..2000).map(|i| format!("B{i}")).collect::<Vec<_>>().join(", "));
        let index_chain =
            format!("permit(principal,action,resource) when {{ principal{} }};", "[\"a\"]".repeat(150_000));
        let sneaky =
            format!("permit(principal,action,resource) when {{ {}true{} }};", "(1>0 && ".repeat(150), ")".repeat(150));
        let cases = [
            (deep_parens, String::new()),
            (deep_if, String::new()),
            (long_and, String::new()),
            (neg, String::new()),
            (sneaky, String::new()),
            ("permit(principal,action,resource);".to_string(), schema_deep),
            ("permit(principal,action,resource);".to_string(), schema_sets),
            ("permit(principal,action,resource);".to_string(), schema_chain),
            ("permit(principal,action,resource);".to_string(), action_chain),
            ("permit(principal,action,resource);".to_string(), wide_list),
            (index_chain, String::new()),
        ];
        std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || {
                for (p, s) in cases {
                    let err = compile(1, &p, &s).err().unwrap_or_else(|| panic!("accepted: {}", &p[..80.min(p.len())]));
                    assert!(!err.0.is_empty());
                }
            })
            .unwrap()
            .join()
            .unwrap();
        // Past the pre-parse bounds' reach, the parsed depth bound refuses a long chain...
        let chain = |n: usize| format!("permit(principal,action,resource) when {{ {} true }};", "true && ".repeat(n));
        assert!(compile(1, &chain(900), "").err().unwrap().0[0].contains("levels deep"));
        // ... and the deepest chain it lets through evaluates on a worker's small stack.
        let n = (1..120).rev().find(|n| compile(1, &chain(*n), "").is_ok()).unwrap();
        let deepest = compile(1, &chain(n), "").unwrap();
        std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || {
                let a = action_uid("Read").unwrap();
                let d =
                    deepest.evaluate(&Uid::new("User", "a"), &a, &Uid::new("I", "x"), Context::empty(), &[]).unwrap();
                assert!(d.allowed);
            })
            .unwrap()
            .join()
            .unwrap();
        // A text with a hundred thousand errors answers a short list, not a reply larger
        // than the text.
        let annotations = format!("@a{}permit(principal,action,resource);", "@a(\"x\")".repeat(100_000));
        let err = compile(1, &annotations, "").err().unwrap();
        assert!(err.0.len() <= 21 && err.to_string().len() < 16 * 1024, "{} bytes", err.to_string().len());
        // Within the bounds, ordinary nesting still compiles.
        let ok = format!("permit(principal,action,resource) when {{ {}true{} }};", "(".repeat(20), ")".repeat(20));
        compile(1, &ok, "").unwrap();
    }

    /// A forbid that errors (it reads an entity that is not loaded) denies: Cedar alone
    /// would skip it and let the permit win.
    #[test]
    fn an_erroring_forbid_denies() {
        let c = compile(
            1,
            r#"@id("p") permit(principal, action, resource);
               @id("frozen") forbid(principal, action, resource) when { Config::"global".frozen };"#,
            "",
        )
        .unwrap();
        let a = action_uid("Write").unwrap();
        let d = c.evaluate(&Uid::new("User", "a"), &a, &Uid::new("Item", "x"), Context::empty(), &[]).unwrap();
        assert!(!d.allowed, "{d:?}");
        assert_eq!(d.determining_policies, vec!["frozen"]);
        // An erroring permit does not allow (and does not deny on its own).
        let c =
            compile(1, r#"@id("p") permit(principal, action, resource) when { Config::"global".open };"#, "").unwrap();
        let d = c.evaluate(&Uid::new("User", "a"), &a, &Uid::new("Item", "x"), Context::empty(), &[]).unwrap();
        assert!(!d.allowed);
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

    const SCHEMA: &str = r#"
        type Token = { sub: String, claims: {} };
        entity User;
        entity Account { owner: User };
        entity Item { account: Account, price: decimal, ip: ipaddr, level: Long, labels?: Set<String> } tags Bool;
        action Read appliesTo { principal: User, resource: Item, context: { token: Token, limit?: decimal } };
    "#;

    const SCHEMA_POLICIES: &str = r#"
        @id("all") permit(principal, action, resource);
        @id("blocked") forbid(principal, action, resource) when { resource.hasTag("blocked") && resource.getTag("blocked") };
        @id("mallory") forbid(principal, action, resource) when { resource.account.owner == User::"mallory" };
        @id("dear") forbid(principal, action, resource) when { resource.price.greaterThan(decimal("0.5")) };
        @id("inside") forbid(principal, action, resource) when { resource.ip.isInRange(ip("10.0.0.0/8")) };
        @id("limit") forbid(principal, action, resource) when { context has limit && context.limit.lessThan(resource.price) };
    "#;

    fn record(ty: &str, id: &str, attrs: Value, tags: Value) -> EntityRecord {
        let (Value::Object(attributes), Value::Object(tags)) = (attrs, tags) else { panic!("objects") };
        EntityRecord { uid: Uid::new(ty, id), attributes, parents: vec![], version: 1, tags }
    }

    fn item(owner_account: &str, price: &str, ip: &str, blocked: bool) -> EntityRecord {
        record(
            "Item",
            "i",
            json!({"account": {"type": "Account", "id": owner_account}, "price": price,
                   "ip": {"fn": "ip", "arg": ip}, "level": 5}),
            json!({"blocked": blocked}),
        )
    }

    fn decide(c: &CompiledPolicies, entities: &[EntityRecord], ctx: Value) -> Decision {
        let a = action_uid("Read").unwrap();
        let Value::Object(ctx) = ctx else { panic!("object") };
        let ctx = c.context(&a, ctx, &SERVER_CONTEXT).unwrap();
        let refs: Vec<&EntityRecord> = entities.iter().collect();
        c.evaluate(&Uid::new("User", "u"), &a, &Uid::new("Item", "i"), ctx, &refs).unwrap()
    }

    /// Tags reach Cedar (schemaless and with a schema): `hasTag`/`getTag` make the forbid fire.
    #[test]
    fn tags_reach_cedar() {
        let plain = compile(1, "@id(\"all\") permit(principal, action, resource);\n@id(\"blocked\") forbid(principal, action, resource) when { resource.hasTag(\"blocked\") && resource.getTag(\"blocked\") };", "").unwrap();
        let e = record("Item", "i", json!({}), json!({"blocked": true}));
        let d = decide(&plain, &[e], json!({}));
        assert!(!d.allowed, "{d:?}");
        assert_eq!(d.determining_policies, vec!["blocked"]);
        let e = record("Item", "i", json!({}), json!({"blocked": false}));
        assert!(decide(&plain, &[e], json!({})).allowed);
    }

    /// With a schema, `{"type", "id"}` is an entity reference, `"0.6"` a decimal and
    /// `{"fn": "ip", …}` an ipaddr, as Cedar reads them; each forbid fires on its own.
    #[test]
    fn schema_reads_entities_as_cedar_does() {
        let c = compile(1, SCHEMA_POLICIES, SCHEMA).unwrap();
        let account = |owner: &str| record("Account", "a", json!({"owner": {"type": "User", "id": owner}}), json!({}));
        let ok = decide(&c, &[account("alice"), item("a", "0.4", "192.168.0.1", false)], json!({}));
        assert!(ok.allowed, "{ok:?}");
        let cases = [
            (account("mallory"), item("a", "0.4", "192.168.0.1", false), json!({}), "mallory"),
            (account("alice"), item("a", "0.6", "192.168.0.1", false), json!({}), "dear"),
            (account("alice"), item("a", "0.4", "10.1.2.3", false), json!({}), "inside"),
            (account("alice"), item("a", "0.4", "192.168.0.1", true), json!({}), "blocked"),
            (account("alice"), item("a", "0.4", "192.168.0.1", false), json!({"limit": "0.3"}), "limit"),
        ];
        for (a, i, ctx, want) in cases {
            let d = decide(&c, &[a, i], ctx);
            assert!(!d.allowed, "{want}: {d:?}");
            assert_eq!(d.determining_policies, vec![want.to_string()], "{d:?}");
            assert!(d.errors.is_empty(), "{d:?}");
        }
    }

    /// The direct (typed) build agrees with Cedar's schema-based parser attribute by attribute.
    #[test]
    fn typed_values_agree_with_cedars_schema_parser() {
        let c = compile(1, SCHEMA_POLICIES, SCHEMA).unwrap();
        let schema = c.schema.as_ref().unwrap();
        let samples = [
            item("a", "0.6", "10.0.0.1", true),
            record(
                "Item",
                "i",
                json!({"account": {"__entity": {"type": "Account", "id": "x"}}, "price": {"__extn": {"fn": "decimal", "arg": "1.25"}}, "ip": "::1", "level": -3, "labels": ["a", "b"]}),
                json!({}),
            ),
            record("Account", "a", json!({"owner": {"type": "User", "id": "alice"}}), json!({})),
        ];
        for e in samples {
            let fast = direct_entity(&e, c.types.as_deref()).expect("direct");
            let slow = parsed_entity(&e, Some(schema)).unwrap();
            for k in e.attributes.keys() {
                assert_eq!(fast.attr(k).map(|r| r.ok()), slow.attr(k).map(|r| r.ok()), "{k}");
            }
            for k in e.tags.keys() {
                assert_eq!(fast.tag(k).map(|r| r.ok()), slow.tag(k).map(|r| r.ok()), "tag {k}");
            }
            c.check_entity(&e).unwrap();
        }
    }

    /// Data that does not conform to the schema is refused, naming the attribute.
    #[test]
    fn nonconforming_entities_and_contexts_are_refused() {
        let c = compile(1, SCHEMA_POLICIES, SCHEMA).unwrap();
        let mut e = item("a", "0.4", "10.0.0.1", false);
        e.attributes.insert("level".into(), json!("5"));
        let err = c.check_entity(&e).unwrap_err();
        assert!(err.contains("level"), "{err}");
        let mut e = item("a", "0.4", "10.0.0.1", false);
        e.attributes.insert("colour".into(), json!("red"));
        let err = c.check_entity(&e).unwrap_err();
        assert!(err.contains("colour"), "{err}");
        let mut e = item("a", "0.4", "10.0.0.1", false);
        e.attributes.remove("level");
        assert!(c.check_entity(&e).unwrap_err().contains("level"));
        let mut e = item("a", "0.4", "10.0.0.1", false);
        e.tags.insert("n".into(), json!(1));
        assert!(c.check_entity(&e).is_err());
        assert!(c.check_entity(&record("Nope", "x", json!({}), json!({}))).is_err());
        let a = action_uid("Read").unwrap();
        let ctx = |v: Value| c.context(&a, v.as_object().unwrap().clone(), &SERVER_CONTEXT);
        assert!(ctx(json!({"limit": 5})).unwrap_err().contains("limit"));
        assert!(ctx(json!({"other": 1})).unwrap_err().contains("other"));
        // Lockstep's own records lose what the schema does not declare, and are never refused.
        let got = ctx(json!({"token": {"sub": "u", "iss": "x", "claims": {"a": 1}}})).unwrap();
        let token = got.get("token").unwrap().to_string();
        assert!(!token.contains("iss") && !token.contains("\"a\""), "{token}");
    }
}
