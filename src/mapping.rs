//! The mapping of Cedar entity types onto the application's own tables (a TOML file:
//! `--mapping FILE` or `LOCKSTEP_MAPPING`). Pure: parsing and structural checks; the
//! store checks it against the live catalog, `policy` against the Cedar schema.
//!
//! ```toml
//! [types.Item]
//! table = "items"                 # "app.items" names a schema; PostgreSQL default: public
//! id = "id"                       # the id column
//! id_type = "text"                # text | integer | uuid
//! version = "version"             # optional integer column, for if_version
//! attributes.title = { column = "title" }                       # type text by default
//! attributes.owner = { column = "owner_id", type = "entity", entity_type = "User" }
//! parents = [{ type = "Folder", column = "folder_id" }]         # a foreign-key column
//!
//! [types.User]
//! table = "users"
//! id = "id"
//! parents = [{ type = "Group", join_table = "memberships", child_column = "user_id", parent_column = "group_id" }]
//! ```
//!
//! Types not mapped stay in Lockstep's own `entities` table.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// How an id column holds a Cedar entity id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdType {
    /// Any text; the Cedar id is the text.
    Text,
    /// A 64-bit integer; the Cedar id is its decimal form (`42`, never `042` or `+42`).
    Integer,
    /// A UUID; the Cedar id is its lowercase hyphenated form.
    Uuid,
}

impl IdType {
    /// The id as the column stores it, in its one canonical text form; None when `id`
    /// cannot be stored in such a column (no such row can exist).
    pub fn canonical(self, id: &str) -> Option<String> {
        match self {
            IdType::Text => Some(id.to_owned()),
            IdType::Integer => id.parse::<i64>().ok().map(|n| n.to_string()).filter(|c| c == id),
            IdType::Uuid => {
                let ok = id.len() == 36
                    && id.char_indices().all(|(i, c)| {
                        if [8, 13, 18, 23].contains(&i) {
                            c == '-'
                        } else {
                            c.is_ascii_digit() || ('a'..='f').contains(&c)
                        }
                    });
                ok.then(|| id.to_owned())
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            IdType::Text => "text",
            IdType::Integer => "integer",
            IdType::Uuid => "uuid",
        }
    }
}

/// How a column holds an attribute's Cedar value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    /// text/varchar ↔ String.
    #[default]
    Text,
    /// smallint/integer/bigint ↔ Long.
    Integer,
    /// boolean (SQLite: 0/1) ↔ Bool.
    Boolean,
    /// json/jsonb (SQLite: JSON text) ↔ any Cedar value (records, sets, …).
    Json,
    /// timestamp/timestamptz (SQLite: ISO-8601 text) ↔ Cedar `datetime` (UTC, milliseconds).
    Datetime,
    /// timestamp/timestamptz (SQLite: ISO-8601 text) ↔ String (ISO-8601 UTC, milliseconds).
    TimestampText,
    /// text[] (SQLite: a JSON array) ↔ Set<String>.
    TextSet,
    /// bigint[]/integer[] (SQLite: a JSON array) ↔ Set<Long>.
    IntegerSet,
    /// A column holding another entity's id ↔ that entity (`entity_type` names its type).
    Entity,
}

impl ColumnType {
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Integer => "integer",
            ColumnType::Boolean => "boolean",
            ColumnType::Json => "json",
            ColumnType::Datetime => "datetime",
            ColumnType::TimestampText => "timestamp_text",
            ColumnType::TextSet => "text_set",
            ColumnType::IntegerSet => "integer_set",
            ColumnType::Entity => "entity",
        }
    }
}

/// One attribute's column.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributeMap {
    pub column: String,
    #[serde(default, rename = "type")]
    pub ty: ColumnType,
    /// For `type = "entity"`: the referenced entity type.
    #[serde(default)]
    pub entity_type: Option<String>,
}

/// Where the parents of one type come from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentMap {
    /// The parents' entity type.
    #[serde(rename = "type")]
    pub ty: String,
    /// A column of the entity's own row holding the parent's id (at most one parent of
    /// this type).
    #[serde(default)]
    pub column: Option<String>,
    /// A join table with one row per (child, parent) edge.
    #[serde(default)]
    pub join_table: Option<String>,
    #[serde(default)]
    pub child_column: Option<String>,
    #[serde(default)]
    pub parent_column: Option<String>,
}

/// A parent source, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParentSource {
    Column(String),
    Join { table: TableName, child: String, parent: String },
}

/// A table, optionally schema-qualified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableName {
    pub schema: Option<String>,
    pub name: String,
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

/// One entity type as the file states it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TypeFile {
    table: String,
    id: String,
    #[serde(default = "default_id_type")]
    id_type: IdType,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, AttributeMap>,
    #[serde(default)]
    parents: Vec<ParentMap>,
}

fn default_id_type() -> IdType {
    IdType::Text
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingFile {
    #[serde(default)]
    types: BTreeMap<String, TypeFile>,
}

/// One mapped entity type, checked.
#[derive(Clone, Debug)]
pub struct TypeMap {
    /// The Cedar entity type (`Item`, `App::Item`).
    pub entity_type: String,
    pub table: TableName,
    pub id_column: String,
    pub id_type: IdType,
    pub version_column: Option<String>,
    /// Attribute name → column, in name order.
    pub attributes: Vec<(String, AttributeMap)>,
    /// (parent type, source), in file order.
    pub parents: Vec<(String, ParentSource)>,
}

/// The whole mapping: the entity types that live in the application's tables.
#[derive(Clone, Debug, Default)]
pub struct Mapping {
    types: BTreeMap<String, TypeMap>,
}

/// Longest mapping file read (it is the operator's, but a bound is cheap).
const MAX_FILE_BYTES: u64 = 1024 * 1024;

impl Mapping {
    /// Reads and checks a mapping file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let len = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("mapping file {}: {e}", path.display()))?.len();
        if len > MAX_FILE_BYTES {
            anyhow::bail!("mapping file {} is {len} bytes; at most {MAX_FILE_BYTES}", path.display());
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("mapping file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("mapping file {}: {e}", path.display()))
    }

    /// Parses and checks mapping text (TOML).
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: MappingFile = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        let mut types = BTreeMap::new();
        for (name, t) in file.types {
            let tm = check_type(&name, t).map_err(|e| format!("type `{name}`: {e}"))?;
            types.insert(name, tm);
        }
        let mapping = Self { types };
        Ok(mapping)
    }

    pub fn get(&self, entity_type: &str) -> Option<&TypeMap> {
        self.types.get(entity_type)
    }

    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    pub fn types(&self) -> impl Iterator<Item = &TypeMap> {
        self.types.values()
    }

    /// Every (table, column) the mapping writes or reads an id from, for the triggers
    /// that order direct writes with Lockstep's decisions: (table, entity type, id column,
    /// version column) — each mapped type's own table, and each join table (whose rows are
    /// the child's parents, so they lock the child).
    pub fn guarded_tables(&self) -> Vec<(TableName, String, String, Option<String>)> {
        let mut out = Vec::new();
        for t in self.types.values() {
            out.push((t.table.clone(), t.entity_type.clone(), t.id_column.clone(), t.version_column.clone()));
            for (_, p) in &t.parents {
                if let ParentSource::Join { table, child, .. } = p {
                    out.push((table.clone(), t.entity_type.clone(), child.clone(), None));
                }
            }
        }
        out
    }
}

/// A SQL identifier the mapping may name: letters, digits and `_`, not starting with a
/// digit, at most 63 bytes (PostgreSQL's limit). Quoted in every statement anyway.
fn check_ident(what: &str, v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !v.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!("{what} `{v}` is not a plain SQL identifier (letters, digits, _; at most 63 bytes)"))
    }
}

fn table_name(what: &str, v: &str) -> Result<TableName, String> {
    match v.split_once('.') {
        Some((s, n)) => {
            check_ident(&format!("{what} schema"), s)?;
            check_ident(what, n)?;
            Ok(TableName { schema: Some(s.to_owned()), name: n.to_owned() })
        }
        None => {
            check_ident(what, v)?;
            Ok(TableName { schema: None, name: v.to_owned() })
        }
    }
}

fn check_type(name: &str, t: TypeFile) -> Result<TypeMap, String> {
    crate::policy::entity_uid(&crate::model::Uid::new(name, "x"))
        .map_err(|e| format!("not a Cedar entity type name: {e}"))?;
    if name == "Action" || name.ends_with("::Action") || name.starts_with("Lockstep::") {
        return Err("action types and Lockstep's own types cannot be mapped".into());
    }
    let table = table_name("table", &t.table)?;
    check_ident("id column", &t.id)?;
    if let Some(v) = &t.version {
        check_ident("version column", v)?;
    }
    let mut columns = vec![t.id.clone()];
    columns.extend(t.version.iter().cloned());
    for (a, m) in &t.attributes {
        if a.is_empty() || a == "__entity" || a == "__extn" {
            return Err(format!("attribute name `{a}` is not allowed"));
        }
        check_ident(&format!("attribute `{a}` column"), &m.column)?;
        match (m.ty, &m.entity_type) {
            (ColumnType::Entity, None) => {
                return Err(format!("attribute `{a}`: type \"entity\" needs `entity_type` (the referenced type)"));
            }
            (ColumnType::Entity, Some(et)) => {
                crate::policy::entity_uid(&crate::model::Uid::new(et.as_str(), "x"))
                    .map_err(|e| format!("attribute `{a}`: entity_type `{et}`: {e}"))?;
            }
            (other, Some(_)) => {
                return Err(format!(
                    "attribute `{a}`: `entity_type` is only for type \"entity\", not \"{}\"",
                    other.name()
                ));
            }
            (_, None) => {}
        }
        columns.push(m.column.clone());
    }
    let mut parents = Vec::new();
    for p in t.parents {
        crate::policy::entity_uid(&crate::model::Uid::new(p.ty.as_str(), "x"))
            .map_err(|e| format!("parent type `{}`: {e}", p.ty))?;
        if parents.iter().any(|(ty, _)| *ty == p.ty) {
            return Err(format!("parent type `{}` is mapped twice", p.ty));
        }
        let source = match (p.column, p.join_table, p.child_column, p.parent_column) {
            (Some(c), None, None, None) => {
                check_ident(&format!("parent `{}` column", p.ty), &c)?;
                columns.push(c.clone());
                ParentSource::Column(c)
            }
            (None, Some(t), Some(c), Some(pc)) => {
                let table = table_name(&format!("parent `{}` join_table", p.ty), &t)?;
                check_ident(&format!("parent `{}` child_column", p.ty), &c)?;
                check_ident(&format!("parent `{}` parent_column", p.ty), &pc)?;
                ParentSource::Join { table, child: c, parent: pc }
            }
            _ => {
                return Err(format!(
                    "parent `{}`: give either `column` (a foreign-key column of the row) or `join_table`, \
                     `child_column` and `parent_column`",
                    p.ty
                ));
            }
        };
        parents.push((p.ty, source));
    }
    let mut sorted = columns.clone();
    sorted.sort();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("column `{}` is mapped twice", w[0]));
    }
    Ok(TypeMap {
        entity_type: name.to_owned(),
        table,
        id_column: t.id,
        id_type: t.id_type,
        version_column: t.version,
        attributes: t.attributes.into_iter().collect(),
        parents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[types.Item]
table = "items"
id = "id"
version = "version"
attributes.title = { column = "title" }
attributes.owner = { column = "owner_id", type = "entity", entity_type = "User" }

[types.User]
table = "app.users"
id = "id"
parents = [{ type = "Group", join_table = "memberships", child_column = "user_id", parent_column = "group_id" }]
"#;

    #[test]
    fn parses_and_names_mistakes() {
        let m = Mapping::parse(EXAMPLE).unwrap();
        let item = m.get("Item").unwrap();
        assert_eq!(item.attributes.len(), 2);
        assert_eq!(m.get("User").unwrap().table.schema.as_deref(), Some("app"));
        let bad = |t: &str| Mapping::parse(t).unwrap_err();
        assert!(bad("[types.Item]\ntable = \"items\"\nid = \"id\"\ncolour = 1").contains("colour"));
        assert!(bad("[types.Item]\ntable = \"items; drop\"\nid = \"id\"").contains("identifier"));
        assert!(bad("[types.Item]\ntable = \"i\"\nid = \"id\"\nattributes.a = { column = \"id\" }").contains("twice"));
        assert!(
            bad("[types.Item]\ntable = \"i\"\nid = \"id\"\nattributes.o = { column = \"o\", type = \"entity\" }")
                .contains("entity_type")
        );
        assert!(bad("[types.Item]\ntable = \"i\"\nid = \"id\"\nparents = [{ type = \"G\" }]").contains("either"));
    }

    #[test]
    fn canonical_ids() {
        assert_eq!(IdType::Integer.canonical("42").as_deref(), Some("42"));
        assert_eq!(IdType::Integer.canonical("042"), None);
        assert_eq!(IdType::Integer.canonical("+42"), None);
        assert_eq!(
            IdType::Uuid.canonical("0e5b6f2a-1c3d-4e5f-8a9b-0c1d2e3f4a5b").as_deref(),
            Some("0e5b6f2a-1c3d-4e5f-8a9b-0c1d2e3f4a5b")
        );
        assert_eq!(IdType::Uuid.canonical("0E5B6F2A-1C3D-4E5F-8A9B-0C1D2E3F4A5B"), None);
    }
}
