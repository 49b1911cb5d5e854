-- Direct writes to the application's mapped tables (see `lockstep mapping install`):
-- each row an INSERT, UPDATE or DELETE touches takes the exclusive advisory lock of its
-- entity, the lock every Lockstep commit takes shared (principal, ancestors) or exclusive
-- (its resource) before it reads that entity, so a direct write and a Lockstep decision
-- that depends on its row are ordered: one waits for the other to commit.
--
-- Arguments: the Cedar entity type, the column holding the entity's id (the row's own
-- id, or a join table's child column), and the version column ('' when none: with one,
-- an UPDATE that leaves it unchanged bumps it, so if_version sees direct writes too).
-- The key is the one the store computes: 'lockstep' US 'entity' US type US id.
--
-- Lockstep's own writes to mapped tables skip the guard: every one of them holds its
-- entity's lock exclusive already (the store reads an entity, taking that lock, before it
-- writes it or its join-table edges) and sets the version column itself. Lockstep's
-- connections say who they are with the `lockstep.writer` setting at connect; the
-- application's connections do not have it, and the guard runs for them.
CREATE FUNCTION guard() RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    ty   text := TG_ARGV[0];
    col  text := TG_ARGV[1];
    vcol text := TG_ARGV[2];
    o    jsonb;
    n    jsonb;
BEGIN
    IF current_setting('lockstep.writer', true) = 'on' THEN
        RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        o := to_jsonb(OLD);
        PERFORM pg_advisory_xact_lock(hashtextextended(
            'lockstep' || chr(31) || 'entity' || chr(31) || ty || chr(31) || (o ->> col), 0));
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        n := to_jsonb(NEW);
        IF TG_OP = 'INSERT' OR (n ->> col) IS DISTINCT FROM (o ->> col) THEN
            PERFORM pg_advisory_xact_lock(hashtextextended(
                'lockstep' || chr(31) || 'entity' || chr(31) || ty || chr(31) || (n ->> col), 0));
        END IF;
        IF TG_OP = 'UPDATE' AND vcol <> '' AND (n -> vcol) IS NOT DISTINCT FROM (o -> vcol) THEN
            NEW := jsonb_populate_record(NEW, jsonb_build_object(vcol, (o ->> vcol)::bigint + 1));
        END IF;
        RETURN NEW;
    END IF;
    RETURN OLD;
END
$$;
