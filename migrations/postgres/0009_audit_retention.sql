-- Audit retention (issue 13): the log stays append-only, except that its oldest events may
-- be dropped once exported. `audit_trim.through_seq` is how far events have been exported
-- and may be dropped; it only grows. Updates stay refused, and so does deleting any event
-- past the mark.
CREATE TABLE lockstep.audit_trim (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    through_seq BIGINT NOT NULL DEFAULT 0
);
INSERT INTO lockstep.audit_trim (id, through_seq) VALUES (1, 0);

CREATE FUNCTION lockstep.audit_append_only_but_trimmed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND OLD.seq <= coalesce((SELECT t.through_seq FROM lockstep.audit_trim t WHERE t.id = 1), 0) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'the audit log is append-only (only events exported by retention may be dropped)';
END
$$;
DROP TRIGGER audit_append_only ON lockstep.audit;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON lockstep.audit
    FOR EACH ROW EXECUTE FUNCTION lockstep.audit_append_only_but_trimmed();

CREATE FUNCTION lockstep.audit_trim_only_grows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.through_seq < OLD.through_seq THEN
        RAISE EXCEPTION 'audit_trim.through_seq only grows';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_trim_only_grows BEFORE UPDATE ON lockstep.audit_trim
    FOR EACH ROW EXECUTE FUNCTION lockstep.audit_trim_only_grows();

-- The mark's one row stays (no insert, no delete), and neither table can be truncated.
-- (These guard against mistakes in SQL, not against the database's owner, who can drop
-- triggers.)
CREATE FUNCTION lockstep.audit_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only (% on %)', TG_OP, TG_TABLE_NAME;
END
$$;
CREATE TRIGGER audit_trim_fixed BEFORE INSERT OR DELETE ON lockstep.audit_trim
    FOR EACH ROW EXECUTE FUNCTION lockstep.audit_refuse();
CREATE TRIGGER audit_trim_no_truncate BEFORE TRUNCATE ON lockstep.audit_trim
    FOR EACH STATEMENT EXECUTE FUNCTION lockstep.audit_refuse();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON lockstep.audit
    FOR EACH STATEMENT EXECUTE FUNCTION lockstep.audit_refuse();
