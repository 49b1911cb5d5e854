-- The guard of the application's mapped tables (migration 0005) steps aside for Lockstep's own
-- writes only in sessions of the role that owns the schema `lockstep` (the role Lockstep
-- migrated it with). Before, it stepped aside for any session that set `lockstep.writer` —
-- which any role can set — so an application connection given Lockstep's settings wrote
-- unguarded. Stepping aside is only a saving: Lockstep's writes hold the locks the guard
-- takes. `lockstep mapping install` runs this file again, so a guard function changed by
-- hand is put back; `lockstep mapping check` compares the function with it. Catalogs are
-- named with their schema, and pg_temp comes last in the function's search_path: a session's
-- temporary table called pg_namespace must not answer for the catalog.
CREATE OR REPLACE FUNCTION lockstep.guard() RETURNS trigger LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ty   text := TG_ARGV[0];
    col  text := TG_ARGV[1];
    vcol text := TG_ARGV[2];
    o    jsonb;
    n    jsonb;
BEGIN
    -- Lockstep's own writes (the setting, in a session of the role that owns the schema
    -- `lockstep`: any role can set a setting, only that one logs in as that role).
    IF current_setting('lockstep.writer', true) = 'on'
       AND session_user = (SELECT pg_catalog.pg_get_userbyid(nspowner) FROM pg_catalog.pg_namespace
                           WHERE nspname = 'lockstep') THEN
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
