-- Lockstep schema, PostgreSQL. Times are unix microseconds unless named *_secs.
-- Kept to SQL that PostgreSQL-compatible distributed engines also accept where that
-- costs nothing (see docs/scaling.md for what would need care there).

CREATE TABLE keys (
    kid            TEXT PRIMARY KEY,
    algorithm      TEXT NOT NULL,
    secret         BYTEA NOT NULL,
    public_key_pem TEXT NOT NULL,
    issuer         TEXT NOT NULL,
    audience       TEXT NOT NULL,
    principal_type TEXT NOT NULL,
    revoked        BOOLEAN NOT NULL DEFAULT FALSE,
    added_at       BIGINT NOT NULL,
    revoked_at     BIGINT
);

CREATE TABLE revoked_tokens (
    token_id        TEXT PRIMARY KEY,
    expires_at_secs BIGINT NOT NULL,
    revoked_at      BIGINT NOT NULL
);
CREATE INDEX revoked_tokens_expiry ON revoked_tokens (expires_at_secs);

-- One row per subject that ever called: every commit share-locks its subject's row,
-- and RevokeSubject / logout lock it exclusively (the locking protocol in src/store).
CREATE TABLE subjects (
    etype           TEXT NOT NULL,
    eid             TEXT NOT NULL,
    revoked_at_secs BIGINT,
    PRIMARY KEY (etype, eid)
);

CREATE TABLE policies (
    version    BIGINT PRIMARY KEY,
    policies   TEXT NOT NULL,
    schema     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE entities (
    etype      TEXT NOT NULL,
    eid        TEXT NOT NULL,
    attributes TEXT NOT NULL,   -- JSON object, Cedar JSON values
    parents    TEXT NOT NULL,   -- JSON array of {"type", "id"}
    version    BIGINT NOT NULL,
    PRIMARY KEY (etype, eid)
);

CREATE TABLE idempotency (
    etype        TEXT NOT NULL,
    eid          TEXT NOT NULL,
    key          TEXT NOT NULL,
    request_hash BYTEA NOT NULL,
    response     TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (etype, eid, key)
);
CREATE INDEX idempotency_created ON idempotency (created_at);

CREATE TABLE audit (
    seq            BIGSERIAL PRIMARY KEY,
    time           BIGINT NOT NULL,
    kind           BIGINT NOT NULL,
    principal_type TEXT,
    principal_id   TEXT,
    token_id       TEXT NOT NULL,
    mutations      TEXT NOT NULL,
    entities       TEXT NOT NULL,
    detail         TEXT NOT NULL
);

CREATE FUNCTION lockstep_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END
$$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION lockstep_audit_append_only();
