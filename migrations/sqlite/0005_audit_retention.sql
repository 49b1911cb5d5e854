-- Audit retention (issue 13): the log stays append-only, except that its oldest events may
-- be dropped once exported. `audit_trim.through_seq` is how far events have been exported
-- and may be dropped; it only grows. Updates stay refused, and so does deleting any event
-- past the mark.
CREATE TABLE audit_trim (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    through_seq INTEGER NOT NULL DEFAULT 0
);
INSERT INTO audit_trim (id, through_seq) VALUES (1, 0);

DROP TRIGGER audit_append_only_delete;
CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
WHEN OLD.seq > coalesce((SELECT through_seq FROM audit_trim WHERE id = 1), 0)
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only (only events exported by retention may be dropped)'); END;

CREATE TRIGGER audit_trim_only_grows BEFORE UPDATE ON audit_trim
WHEN NEW.through_seq < OLD.through_seq
BEGIN SELECT RAISE(ABORT, 'audit_trim.through_seq only grows'); END;

-- The mark's one row stays (no insert, no delete). (These guard against mistakes in SQL, not
-- against the file's owner, who can drop triggers.)
CREATE TRIGGER audit_trim_no_insert BEFORE INSERT ON audit_trim
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only (insert on audit_trim)'); END;
CREATE TRIGGER audit_trim_no_delete BEFORE DELETE ON audit_trim
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only (delete on audit_trim)'); END;
