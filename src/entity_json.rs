//! Cedar entities JSON as files hold it (`lockstep entities import`, policy test files):
//! parsed strictly (duplicate keys refused, as Cedar does), each entity read into the
//! domain model. Shared by the CLI and the policy test runner.

use crate::model::{EntityRecord, Uid};
use anyhow::{Context, bail};
use serde_json::Value;

/// Parses Cedar's entities JSON: `[{"uid": {"type", "id"}, "attrs": {…}, "parents": […],
/// "tags": {…}}]`; a uid or parent may also be written `{"__entity": {"type", "id"}}`. A key
/// given twice in one object is refused, as Cedar refuses it.
pub fn parse_entities(text: &str) -> anyhow::Result<Vec<EntityRecord>> {
    let v = parse_json_strict(text).context("entities file is not JSON")?;
    let Value::Array(v) = v else { bail!("entities file must be a JSON array of Cedar entities") };
    v.into_iter().enumerate().map(|(i, e)| entity_of_json(i, &e)).collect()
}

/// One entity of Cedar's entities JSON (`i`: its place in the file, for messages).
pub fn entity_of_json(i: usize, e: &Value) -> anyhow::Result<EntityRecord> {
    let Value::Object(o) = e else { bail!("entity {i} must be an object with `uid`, `attrs` and `parents`") };
    if let Some(k) = o.keys().find(|k| !matches!(k.as_str(), "uid" | "attrs" | "parents" | "tags")) {
        bail!("entity {i}: unknown field `{k}` (expected `uid`, `attrs`, `parents`, `tags`)");
    }
    let uid = o
        .get("uid")
        .and_then(uid_of_json)
        .with_context(|| format!("entity {i}: `uid` must be {{\"type\", \"id\"}}"))?;
    let record = |field: &str| match o.get(field) {
        None => Ok(serde_json::Map::new()),
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(_) => Err(anyhow::anyhow!("entity {i}: `{field}` must be an object")),
    };
    let (attributes, tags) = (record("attrs")?, record("tags")?);
    let parents = match o.get("parents") {
        None => Vec::new(),
        Some(Value::Array(ps)) => ps
            .iter()
            .map(uid_of_json)
            .collect::<Option<Vec<_>>>()
            .with_context(|| format!("entity {i}: `parents` must be a list of {{\"type\", \"id\"}}"))?,
        Some(_) => bail!("entity {i}: `parents` must be a list of {{\"type\", \"id\"}}"),
    };
    Ok(EntityRecord { uid, attributes, parents, version: 0, tags })
}

/// A uid as Cedar's entity JSON writes it: `{"type", "id"}` or `{"__entity": {"type", "id"}}`.
fn uid_of_json(v: &Value) -> Option<Uid> {
    let o = v.as_object()?;
    let o = match o.get("__entity") {
        Some(Value::Object(inner)) if o.len() == 1 => inner,
        _ => o,
    };
    match (o.len(), o.get("type"), o.get("id")) {
        (2, Some(Value::String(ty)), Some(Value::String(id))) => Some(Uid::new(ty.clone(), id.clone())),
        _ => None,
    }
}

/// JSON text to a value, refusing an object that has a key twice (serde_json keeps the
/// last, Cedar refuses), naming the key.
pub fn parse_json_strict(text: &str) -> anyhow::Result<Value> {
    use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
    struct Strict;
    impl<'de> DeserializeSeed<'de> for Strict {
        type Value = Value;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Strict {
        type Value = Value;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
            Ok(Value::Bool(b))
        }
        fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
            Ok(Value::from(n))
        }
        fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
            Ok(Value::from(n))
        }
        fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
            Ok(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number))
        }
        fn visit_str<E>(self, s: &str) -> Result<Value, E> {
            Ok(Value::String(s.to_owned()))
        }
        fn visit_string<E>(self, s: String) -> Result<Value, E> {
            Ok(Value::String(s))
        }
        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut out = Vec::new();
            while let Some(v) = seq.next_element_seed(Strict)? {
                out.push(v);
            }
            Ok(Value::Array(out))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut out = serde_json::Map::new();
            while let Some(k) = map.next_key::<String>()? {
                let v = map.next_value_seed(Strict)?;
                if out.insert(k.clone(), v).is_some() {
                    return Err(A::Error::custom(format!("duplicate key `{k}`")));
                }
            }
            Ok(Value::Object(out))
        }
    }
    let mut d = serde_json::Deserializer::from_str(text);
    let v = Strict.deserialize(&mut d)?;
    d.end()?;
    Ok(v)
}
