-- Lockstep schema, SQLite. Times are unix microseconds unless named *_secs.

CREATE TABLE keys (
    kid            TEXT PRIMARY KEY,
    algorithm      TEXT NOT NULL,
    secret         BLOB NOT NULL,
    public_key_pem TEXT NOT NULL,
    issuer         TEXT NOT NULL,
    audience       TEXT NOT NULL,
    principal_type TEXT NOT NULL,
    revoked        INTEGER NOT NULL DEFAULT 0,
    added_at       INTEGER NOT NULL,
    revoked_at     INTEGER
);

CREATE TABLE revoked_tokens (
    token_id        TEXT PRIMARY KEY,
    expires_at_secs INTEGER NOT NULL,
    revoked_at      INTEGER NOT NULL
);
CREATE INDEX revoked_tokens_expiry ON revoked_tokens (expires_at_secs);

CREATE TABLE revoked_subjects (
    etype           TEXT NOT NULL,
    eid             TEXT NOT NULL,
    revoked_at_secs INTEGER NOT NULL,
    PRIMARY KEY (etype, eid)
) WITHOUT ROWID;

CREATE TABLE policies (
    version    INTEGER PRIMARY KEY,
    policies   TEXT NOT NULL,
    schema     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE entities (
    etype      TEXT NOT NULL,
    eid        TEXT NOT NULL,
    attributes TEXT NOT NULL,   -- JSON object, Cedar JSON values
    parents    TEXT NOT NULL,   -- JSON array of {"type", "id"}
    version    INTEGER NOT NULL,
    PRIMARY KEY (etype, eid)
) WITHOUT ROWID;

CREATE TABLE idempotency (
    etype        TEXT NOT NULL,
    eid          TEXT NOT NULL,
    key          TEXT NOT NULL,
    request_hash BLOB NOT NULL,
    response     TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (etype, eid, key)
) WITHOUT ROWID;
CREATE INDEX idempotency_created ON idempotency (created_at);

CREATE TABLE audit (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    time           INTEGER NOT NULL,
    kind           INTEGER NOT NULL,
    principal_type TEXT,
    principal_id   TEXT,
    token_id       TEXT NOT NULL,
    mutations      TEXT NOT NULL,
    entities       TEXT NOT NULL,
    detail         TEXT NOT NULL
);

CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
