//! Entities kept in the application's own tables (see `crate::mapping`): the conversions
//! between their rows and Cedar entity records, shared by both stores. Each store reads a
//! row into a JSON object keyed as `row_key` says and writes the column values that
//! `columns_of` gives; the SQL is the store's own.

use super::{StoreError, StoreResult};
use crate::mapping::{ColumnType, IdType, Mapping, ParentSource, TypeMap};
use crate::model::{Attributes, EntityRecord, Uid};
use serde_json::{Map, Value, json};

/// Keys of the row object a store reads: `a{i}` the i-th attribute's column, `p{i}` the
/// i-th parent source (a column's id text, or a join table's array of id texts), `v` the
/// version column.
pub(crate) fn attr_key(i: usize) -> String {
    format!("a{i}")
}

pub(crate) fn parent_key(i: usize) -> String {
    format!("p{i}")
}

pub(crate) const VERSION_KEY: &str = "v";

/// The version reported for a type without a version column (its changes are not counted).
pub(crate) const UNVERSIONED: u64 = 1;

/// A value read from a mapped column that Cedar cannot take: names the column.
fn unreadable(tm: &TypeMap, column: &str, why: &str) -> StoreError {
    StoreError::Invalid(format!(
        "{}.{column} (entity type {}) holds a value Lockstep cannot read as Cedar: {why}",
        tm.table, tm.entity_type
    ))
}

/// JSON text in a column of type json or a set (SQLite stores them as text).
fn parse_text(tm: &TypeMap, column: &str, v: Value) -> StoreResult<Value> {
    match v {
        Value::String(s) => serde_json::from_str(&s).map_err(|e| unreadable(tm, column, &format!("not JSON: {e}"))),
        other => Ok(other),
    }
}

/// Cedar has no null: a JSON value read from a json column must not hold one.
fn refuse_nested_null(tm: &TypeMap, column: &str, v: &Value) -> StoreResult<()> {
    let mut stack = vec![(v, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        if depth > 32 {
            return Err(unreadable(tm, column, "nested deeper than 32 levels"));
        }
        match v {
            Value::Null => return Err(unreadable(tm, column, "a null inside a JSON value")),
            Value::Array(a) => stack.extend(a.iter().map(|x| (x, depth + 1))),
            Value::Object(o) => stack.extend(o.values().map(|x| (x, depth + 1))),
            _ => {}
        }
    }
    Ok(())
}

/// The entity record of one row (`row` as described at `attr_key`).
pub(crate) fn record_from_row(tm: &TypeMap, id: String, mut row: Map<String, Value>) -> StoreResult<EntityRecord> {
    let mut attributes = Attributes::new();
    for (i, (name, m)) in tm.attributes.iter().enumerate() {
        let v = row.remove(&attr_key(i)).unwrap_or(Value::Null);
        if v.is_null() {
            continue; // NULL: the attribute is absent
        }
        let col = m.column.as_str();
        let cedar = match m.ty {
            ColumnType::Text | ColumnType::TimestampText => match v {
                Value::String(_) => v,
                Value::Number(n) => Value::String(n.to_string()),
                Value::Bool(b) => Value::String(b.to_string()),
                _ => return Err(unreadable(tm, col, "not text")),
            },
            ColumnType::Integer => match v.as_i64() {
                Some(n) => json!(n),
                None => return Err(unreadable(tm, col, "not a 64-bit integer")),
            },
            ColumnType::Boolean => match v {
                Value::Bool(_) => v,
                Value::Number(n) if n.as_i64() == Some(0) => Value::Bool(false),
                Value::Number(n) if n.as_i64() == Some(1) => Value::Bool(true),
                _ => return Err(unreadable(tm, col, "not a boolean (or 0/1)")),
            },
            ColumnType::Json => {
                let v = parse_text(tm, col, v)?;
                refuse_nested_null(tm, col, &v)?;
                v
            }
            ColumnType::Datetime => match v {
                Value::String(s) => json!({"__extn": {"fn": "datetime", "arg": s}}),
                _ => return Err(unreadable(tm, col, "not a timestamp")),
            },
            ColumnType::TextSet | ColumnType::IntegerSet => {
                let v = parse_text(tm, col, v)?;
                let Value::Array(items) = v else { return Err(unreadable(tm, col, "not an array")) };
                let want_text = m.ty == ColumnType::TextSet;
                if items.iter().any(|x| if want_text { !x.is_string() } else { x.as_i64().is_none() }) {
                    return Err(unreadable(tm, col, "an array element of the wrong type (or null)"));
                }
                Value::Array(items)
            }
            ColumnType::Entity => {
                let target = m.entity_type.clone().unwrap_or_default();
                match v {
                    Value::String(s) => Uid::new(target, s).to_entity_ref_json(),
                    Value::Number(n) => Uid::new(target, n.to_string()).to_entity_ref_json(),
                    _ => return Err(unreadable(tm, col, "not an id")),
                }
            }
        };
        attributes.insert(name.clone(), cedar);
    }
    let mut parents = Vec::new();
    for (i, (ty, source)) in tm.parents.iter().enumerate() {
        let v = row.remove(&parent_key(i)).unwrap_or(Value::Null);
        let ids = match (source, v) {
            (_, Value::Null) => Vec::new(),
            (ParentSource::Column(_), Value::String(s)) => vec![s],
            (ParentSource::Column(_), Value::Number(n)) => vec![n.to_string()],
            (ParentSource::Join { table, .. }, v) => {
                let col = format!("{table} (join table)");
                match parse_text(tm, &col, v)? {
                    Value::Array(a) => a
                        .into_iter()
                        .filter_map(|x| match x {
                            Value::String(s) => Some(s),
                            Value::Number(n) => Some(n.to_string()),
                            _ => None,
                        })
                        .collect(),
                    _ => return Err(unreadable(tm, &col, "not a list of parent ids")),
                }
            }
            (ParentSource::Column(c), _) => return Err(unreadable(tm, c, "not an id")),
        };
        parents.extend(ids.into_iter().map(|id| Uid::new(ty.clone(), id)));
    }
    let version = match tm.version_column.as_deref() {
        None => UNVERSIONED,
        Some(col) => match row.remove(VERSION_KEY).and_then(|v| v.as_i64()) {
            Some(n) if n >= 0 => n as u64,
            _ => return Err(unreadable(tm, col, "the version column is not a non-negative integer")),
        },
    };
    Ok(EntityRecord { uid: Uid::new(tm.entity_type.clone(), id), attributes, parents, version, tags: Map::new() })
}

/// Caller text quoted in a message, cut to 128 characters.
fn short(s: &str) -> String {
    match s.char_indices().nth(128) {
        None => s.to_owned(),
        Some((i, _)) => format!("{}…", &s[..i]),
    }
}

/// A value a write cannot store: names the attribute and column (INVALID_ARGUMENT).
fn unstorable(tm: &TypeMap, what: &str, why: &str) -> StoreError {
    StoreError::Invalid(format!("{} {what} (table {}): {why}; nothing was committed", tm.entity_type, tm.table))
}

/// The id of an entity reference in Cedar JSON (`{"__entity": {...}}` or `{"type", "id"}`).
fn entity_ref(v: &Value) -> Option<Uid> {
    let inner = v.get("__entity").unwrap_or(v);
    Some(Uid::new(inner.get("type")?.as_str()?, inner.get("id")?.as_str()?))
}

/// One column value to write: the column, how it is typed, and the value as JSON (`Null`
/// clears the column).
pub(crate) struct ColumnValue {
    pub column: String,
    pub ty: ColumnType,
    /// For ids of an integer-typed entity (the row's id, references, parents).
    pub integer_id: bool,
    pub value: Value,
}

/// The id of `uid` as its type's id column stores it, checked.
pub(crate) fn stored_id(tm: &TypeMap, uid: &Uid) -> StoreResult<String> {
    tm.id_type.canonical(&uid.id).ok_or_else(|| {
        unstorable(
            tm,
            &format!("id `{}`", short(&uid.id)),
            &format!("column {} holds {} ids (canonical form only)", tm.id_column, tm.id_type.name()),
        )
    })?;
    Ok(uid.id.clone())
}

/// Whether ids of `ty` are integers (so a column referring to them is written as one).
fn integer_ids(mapping: &Mapping, ty: &str) -> bool {
    mapping.get(ty).is_some_and(|t| t.id_type == IdType::Integer)
}

/// The id column, every mapped attribute column, every parent column and the version
/// column of `e` as they must be written, checked against the mapping: unmapped
/// attributes, tags, parents of an unmapped type and values of the wrong type are
/// INVALID_ARGUMENT naming the attribute and column.
pub(crate) fn columns_of(mapping: &Mapping, tm: &TypeMap, e: &EntityRecord) -> StoreResult<Vec<ColumnValue>> {
    if !e.tags.is_empty() {
        return Err(unstorable(tm, "tags", "entity tags are not stored for types in the application's tables"));
    }
    if let Some(extra) = e.attributes.keys().find(|k| !tm.attributes.iter().any(|(a, _)| a == *k)) {
        return Err(unstorable(tm, &format!("attribute `{}`", short(extra)), "the mapping has no column for it"));
    }
    let id = stored_id(tm, &e.uid)?;
    let mut out = vec![ColumnValue {
        column: tm.id_column.clone(),
        ty: ColumnType::Text,
        integer_id: tm.id_type == IdType::Integer,
        value: Value::String(id),
    }];
    for (name, m) in &tm.attributes {
        let what = format!("attribute `{name}` (column {})", m.column);
        let bad = |why: &str| unstorable(tm, &what, why);
        let v = e.attributes.get(name).cloned().unwrap_or(Value::Null);
        let mut integer_id = false;
        let value =
            match (m.ty, v) {
                (_, Value::Null) => Value::Null,
                (ColumnType::Text, v @ Value::String(_)) => v,
                (ColumnType::TimestampText, Value::String(t)) => Value::String(utc_timestamp(&t).ok_or_else(|| {
                    bad("expected an ISO-8601 time (YYYY-MM-DD, or …Thh:mm:ss[.sss] with Z or an offset)")
                })?),
                (ColumnType::Integer, v) if v.as_i64().is_some() => v,
                (ColumnType::Boolean, v @ Value::Bool(_)) => v,
                (ColumnType::Json, v) => v,
                (ColumnType::Datetime, v) => {
                    let text = match &v {
                        Value::String(t) => Some(t.as_str()),
                        v => v
                            .get("__extn")
                            .filter(|x| x.get("fn").and_then(Value::as_str) == Some("datetime"))
                            .and_then(|x| x.get("arg"))
                            .and_then(Value::as_str),
                    };
                    let utc = text.and_then(utc_timestamp);
                    Value::String(utc.ok_or_else(|| {
                        bad("expected a datetime (YYYY-MM-DD, or …Thh:mm:ss[.sss] with Z or an offset)")
                    })?)
                }
                (ColumnType::TextSet, Value::Array(a)) if a.iter().all(Value::is_string) => Value::Array(a),
                (ColumnType::IntegerSet, Value::Array(a)) if a.iter().all(|x| x.as_i64().is_some()) => Value::Array(a),
                (ColumnType::Entity, v) => {
                    let target = m.entity_type.as_deref().unwrap_or_default();
                    let Some(r) = entity_ref(&v) else { return Err(bad("expected an entity reference")) };
                    if r.ty != target {
                        return Err(bad(&format!("refers to a {}; the column holds {target} ids", r.ty)));
                    }
                    if let Some(t) = mapping.get(target)
                        && t.id_type.canonical(&r.id).is_none()
                    {
                        return Err(bad(&format!("{target} ids are {} (canonical form only)", t.id_type.name())));
                    }
                    integer_id = integer_ids(mapping, target);
                    Value::String(r.id)
                }
                (ty, _) => return Err(bad(&format!("expected a value for a {} column", ty.name()))),
            };
        out.push(ColumnValue { column: m.column.clone(), ty: m.ty, integer_id, value });
    }
    for p in &e.parents {
        if !tm.parents.iter().any(|(ty, _)| *ty == p.ty) {
            return Err(unstorable(
                tm,
                &format!("parent {}", short(&p.to_string())),
                &format!("the mapping has no parents of type {} for it", p.ty),
            ));
        }
    }
    for (ty, source) in &tm.parents {
        let ParentSource::Column(c) = source else { continue };
        let mut of_type = e.parents.iter().filter(|p| p.ty == *ty);
        let value = match (of_type.next(), of_type.next()) {
            (None, _) => Value::Null,
            (Some(p), None) => {
                if let Some(t) = mapping.get(ty)
                    && t.id_type.canonical(&p.id).is_none()
                {
                    return Err(unstorable(tm, &format!("parent {p}"), &format!("{ty} ids are {}", t.id_type.name())));
                }
                Value::String(p.id.clone())
            }
            (Some(_), Some(_)) => {
                return Err(unstorable(tm, &format!("parents of type {ty}"), &format!("column {c} holds only one")));
            }
        };
        out.push(ColumnValue { column: c.clone(), ty: ColumnType::Text, integer_id: integer_ids(mapping, ty), value });
    }
    if let Some(vc) = &tm.version_column {
        out.push(ColumnValue {
            column: vc.clone(),
            ty: ColumnType::Integer,
            integer_id: false,
            value: json!(super::to_i64(e.version)),
        });
    }
    Ok(out)
}

/// The columns an update from `before` to `after` writes: those whose value changes, and
/// the version column.
pub(crate) fn changed_columns(
    mapping: &Mapping,
    tm: &TypeMap,
    before: &EntityRecord,
    after: &EntityRecord,
) -> StoreResult<Vec<ColumnValue>> {
    let new = columns_of(mapping, tm, after)?;
    let old = columns_of(mapping, tm, before).unwrap_or_default();
    Ok(new
        .into_iter()
        .filter(|v| {
            Some(&v.column) == tm.version_column.as_ref()
                || !old.iter().any(|o| o.column == v.column && o.value == v.value)
        })
        .collect())
}

/// The join-table edges of `e` (parent type index in `tm.parents`, parent id) — checked
/// like `columns_of`.
pub(crate) fn join_edges(mapping: &Mapping, tm: &TypeMap, parents: &[Uid]) -> StoreResult<Vec<(usize, String)>> {
    let mut out = Vec::new();
    for p in parents {
        if let Some(i) = tm.parents.iter().position(|(ty, s)| *ty == p.ty && matches!(s, ParentSource::Join { .. })) {
            if let Some(t) = mapping.get(&p.ty)
                && t.id_type.canonical(&p.id).is_none()
            {
                return Err(unstorable(tm, &format!("parent {p}"), &format!("{} ids are {}", p.ty, t.id_type.name())));
            }
            out.push((i, p.id.clone()));
        }
    }
    Ok(out)
}

/// Join-table edges: (index of the parent source in `TypeMap::parents`, parent id).
pub(crate) type Edges = Vec<(usize, String)>;

/// Edges added and removed between two parent lists (join-table sources only).
pub(crate) fn edge_changes(
    mapping: &Mapping,
    tm: &TypeMap,
    before: &[Uid],
    after: &[Uid],
) -> StoreResult<(Edges, Edges)> {
    let added: Vec<Uid> = after.iter().filter(|p| !before.contains(p)).cloned().collect();
    let removed: Vec<Uid> = before.iter().filter(|p| !after.contains(p)).cloned().collect();
    Ok((join_edges(mapping, tm, &added)?, join_edges(mapping, tm, &removed)?))
}

/// An ISO-8601 time in the forms Cedar's `datetime` takes (`YYYY-MM-DD`,
/// `YYYY-MM-DDThh:mm:ss[.s{1,3}]` then `Z`, `±hhmm` or `±hh:mm`), as the one form every
/// mapped timestamp column holds and is read back as: UTC, `YYYY-MM-DDThh:mm:ss.sssZ`.
/// None for anything else (`yesterday`, a time without a zone, a 25th hour): a value a
/// column could hold but not give back as it was sent is refused, not stored.
pub(crate) fn utc_timestamp(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        part.iter().all(u8::is_ascii_digit).then(|| part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') || !(1..=12).contains(&mo) {
        return None;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][(mo - 1) as usize];
    if !(1..=days_in).contains(&d) {
        return None;
    }
    let (mut h, mut mi, mut sec, mut ms, mut offset) = (0, 0, 0, 0i64, 0i64);
    if b.len() > 10 {
        if b[10] != b'T' || b.get(13) != Some(&b':') || b.get(16) != Some(&b':') {
            return None;
        }
        (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if h > 23 || mi > 59 || sec > 59 {
            return None;
        }
        let mut i = 19;
        if b.get(i) == Some(&b'.') {
            let start = i + 1;
            let end = (start..b.len()).find(|j| !b[*j].is_ascii_digit()).unwrap_or(b.len());
            if end == start || end - start > 3 {
                return None;
            }
            ms = num(start..end)? * [100, 10, 1][end - start - 1];
            i = end;
        }
        offset = match &b[i..] {
            [b'Z'] => 0,
            [sign @ (b'+' | b'-'), rest @ ..] => {
                let digits: Vec<u8> = rest.iter().copied().filter(|c| *c != b':').collect();
                let colon_ok = rest.len() == 4 || (rest.len() == 5 && rest[2] == b':');
                if !colon_ok || digits.len() != 4 || !digits.iter().all(u8::is_ascii_digit) {
                    return None;
                }
                let oh = i64::from(digits[0] - b'0') * 10 + i64::from(digits[1] - b'0');
                let om = i64::from(digits[2] - b'0') * 10 + i64::from(digits[3] - b'0');
                if oh > 23 || om > 59 {
                    return None;
                }
                (oh * 60 + om) * if *sign == b'+' { 1 } else { -1 }
            }
            _ => return None,
        };
    }
    // Days from the civil date (H. Hinnant's algorithm), then back, in UTC.
    let days = {
        let y = if mo <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (mo + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
    };
    let total = days * 86_400_000 + ((h * 60 + mi - offset) * 60 + sec) * 1000 + ms;
    let (days, rest) = (total.div_euclid(86_400_000), total.rem_euclid(86_400_000));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    if !(0..=9999).contains(&y) {
        return None;
    }
    let (h, rest) = (rest / 3_600_000, rest % 3_600_000);
    let (mi, rest) = (rest / 60_000, rest % 60_000);
    Some(format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{:02}.{:03}Z", rest / 1000, rest % 1000))
}

/// Double-quoted SQL identifier (the mapping admits plain identifiers only; quoting keeps
/// reserved words and case as written).
pub(crate) fn q(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A table as SQL: `"schema"."name"`, or `default_schema` when the mapping names none.
pub(crate) fn qt(t: &crate::mapping::TableName, default_schema: Option<&str>) -> String {
    match t.schema.as_deref().or(default_schema) {
        Some(s) => format!("{}.{}", q(s), q(&t.name)),
        None => q(&t.name),
    }
}

#[cfg(test)]
mod tests {
    use super::utc_timestamp;

    #[test]
    fn timestamps_are_refused_or_made_utc() {
        assert_eq!(utc_timestamp("2024-02-29").as_deref(), Some("2024-02-29T00:00:00.000Z"));
        assert_eq!(utc_timestamp("2024-01-01T00:30:00+0100").as_deref(), Some("2023-12-31T23:30:00.000Z"));
        assert_eq!(utc_timestamp("2024-12-31T23:00:00.5-02:00").as_deref(), Some("2025-01-01T01:00:00.500Z"));
        assert_eq!(utc_timestamp("2024-06-01T12:00:00.123Z").as_deref(), Some("2024-06-01T12:00:00.123Z"));
        for bad in [
            "yesterday",
            "2023-02-29",
            "2024-01-01 00:00:00+05",
            "2024-01-01T00:00:00",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00.1234Z",
            "2024-13-01",
            "2024-01-01T00:00:00+5",
            "",
        ] {
            assert_eq!(utc_timestamp(bad), None, "{bad}");
        }
    }
}
