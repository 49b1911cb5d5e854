//! The PostgreSQL wire: statements with their arguments (`Q`), prepared once per
//! connection; rows decoded into the store's row shapes; driver and pool errors mapped to
//! the store's. tokio-postgres sends what is awaited together in one write (pipelining).

use super::super::{AuditRow, EntityRow, KeyRow, LinkRow, PolicyRow, StoreError, StoreResult};
use deadpool_postgres::PoolError;
use std::borrow::Cow;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

/// One statement and its arguments, bound in order (`$1`, `$2`, …).
pub(super) struct Q<'a> {
    pub sql: Cow<'a, str>,
    params: Vec<Box<dyn ToSql + Sync + Send + 'a>>,
}

pub(super) fn q<'a>(sql: impl Into<Cow<'a, str>>) -> Q<'a> {
    Q { sql: sql.into(), params: Vec::new() }
}

impl<'a> Q<'a> {
    pub fn bind<T: ToSql + Sync + Send + 'a>(mut self, v: T) -> Self {
        self.params.push(Box::new(v));
        self
    }

    pub fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect()
    }
}

/// Maps a driver error: retry (serialization failure, deadlock), unavailable (connection
/// lost, server shutting down, timeouts), conflict, invalid input, or a bug.
pub(super) fn map_err(e: tokio_postgres::Error) -> StoreError {
    let Some(db) = e.as_db_error() else {
        // No answer from the server (the connection failed), or a value that did not fit.
        let text = e.to_string();
        let unreachable = ["error communicating", "connection closed", "error connecting", "timeout waiting", "TLS"];
        if e.is_closed() || unreachable.iter().any(|u| text.contains(u)) {
            return StoreError::Unavailable(format!("database connection failed: {text}"));
        }
        return StoreError::Internal(text);
    };
    let code = db.code().code();
    match code {
        "40001" | "40P01" => StoreError::Retry(db.message().to_owned()),
        "23505" => StoreError::Conflict(constraint_message(db).replacen("refused the write", "refused a duplicate", 1)),
        "23502" | "23503" | "23514" | "23P01" => StoreError::Invalid(constraint_message(db)),
        c if c.starts_with("22") => StoreError::Invalid(constraint_message(db)),
        "57014" | "55P03" => StoreError::Unavailable("the database did not answer in time".into()),
        // A table or column the statement names is gone (a mapped column dropped or renamed
        // under a running server, before its check every half second notices): the
        // database is not as Lockstep needs it, which is not the caller's doing.
        "42703" | "42P01" => StoreError::Unavailable(format!(
            "the database is not as Lockstep expects ({}); `lockstep mapping check` names what changed",
            db.message()
        )),
        c if c.starts_with("08") || c.starts_with("53") || c.starts_with("57P") => {
            StoreError::Unavailable(format!("database unavailable: {}", db.message()))
        }
        _ => StoreError::Internal(format!("{}: {}", db.code().code(), db.message())),
    }
}

/// A pool error: no connection within the acquire timeout, or none could be opened.
pub(super) fn map_pool_err(e: PoolError) -> StoreError {
    match e {
        PoolError::Timeout(_) => {
            StoreError::Unavailable("timed out waiting for a database connection; nothing was committed, retry".into())
        }
        PoolError::Backend(e) => map_err(e),
        other => StoreError::Unavailable(format!("database connection failed: {other}")),
    }
}

/// A constraint or conversion error as the caller reads it: PostgreSQL's message (which
/// names the column or constraint) and its detail.
fn constraint_message(db: &tokio_postgres::error::DbError) -> String {
    let detail = db.detail().map(|d| format!(" ({d})")).unwrap_or_default();
    let column = db.column().map(|c| format!(" [column {c}]")).unwrap_or_default();
    format!("the database refused the write: {}{detail}{column}; nothing was committed", db.message())
}

/// A column of `row` by name.
pub(super) fn get<'r, T: tokio_postgres::types::FromSql<'r>>(row: &'r Row, col: &str) -> StoreResult<T> {
    row.try_get(col).map_err(|e| StoreError::Internal(format!("column {col}: {e}")))
}

/// A column of `row` by position.
pub(super) fn at<'r, T: tokio_postgres::types::FromSql<'r>>(row: &'r Row, i: usize) -> StoreResult<T> {
    row.try_get(i).map_err(|e| StoreError::Internal(format!("column {i}: {e}")))
}

/// The row shapes, decoded by column name.
pub(super) trait FromPgRow: Sized {
    fn from_row(r: &Row) -> StoreResult<Self>;
}

impl FromPgRow for EntityRow {
    fn from_row(r: &Row) -> StoreResult<Self> {
        Ok(EntityRow {
            etype: get(r, "etype")?,
            eid: get(r, "eid")?,
            attributes: get(r, "attributes")?,
            parents: get(r, "parents")?,
            version: get(r, "version")?,
            tags: get(r, "tags")?,
        })
    }
}

impl FromPgRow for KeyRow {
    fn from_row(r: &Row) -> StoreResult<Self> {
        Ok(KeyRow {
            kid: get(r, "kid")?,
            algorithm: get(r, "algorithm")?,
            secret: get(r, "secret")?,
            public_key_pem: get(r, "public_key_pem")?,
            issuer: get(r, "issuer")?,
            audience: get(r, "audience")?,
            principal_type: get(r, "principal_type")?,
            revoked: get(r, "revoked")?,
            added_at: get(r, "added_at")?,
            jwk: get(r, "jwk")?,
            source: get(r, "source")?,
            retired: get(r, "retired")?,
            required_typ: get(r, "required_typ")?,
            max_lifetime_secs: get(r, "max_lifetime_secs")?,
            signing: get(r, "signing")?,
            private_key: get(r, "private_key")?,
        })
    }
}

impl FromPgRow for PolicyRow {
    fn from_row(r: &Row) -> StoreResult<Self> {
        Ok(PolicyRow {
            version: get(r, "version")?,
            policies: get(r, "policies")?,
            schema: get(r, "schema")?,
            created_at: get(r, "created_at")?,
        })
    }
}

impl FromPgRow for AuditRow {
    fn from_row(r: &Row) -> StoreResult<Self> {
        Ok(AuditRow {
            seq: get(r, "seq")?,
            time: get(r, "time")?,
            kind: get(r, "kind")?,
            principal_type: get(r, "principal_type")?,
            principal_id: get(r, "principal_id")?,
            token_id: get(r, "token_id")?,
            mutations: get(r, "mutations")?,
            entities: get(r, "entities")?,
            detail: get(r, "detail")?,
        })
    }
}

impl FromPgRow for LinkRow {
    fn from_row(r: &Row) -> StoreResult<Self> {
        Ok(LinkRow {
            link_id: get(r, "link_id")?,
            template_id: get(r, "template_id")?,
            principal_type: get(r, "principal_type")?,
            principal_id: get(r, "principal_id")?,
            resource_type: get(r, "resource_type")?,
            resource_id: get(r, "resource_id")?,
        })
    }
}

/// Decodes every row.
pub(super) fn decode<T: FromPgRow>(rows: &[Row]) -> StoreResult<Vec<T>> {
    rows.iter().map(T::from_row).collect()
}
