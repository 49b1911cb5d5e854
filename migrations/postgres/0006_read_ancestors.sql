-- The entities named (as type || chr(31) || id) and all their ancestors, each once, level by
-- level, in ONE round trip, each entity found by its primary key (a recursive CTE over the
-- JSON parents planned hash joins over the whole table: its cost grew with the table).
-- With p_lock, each level's entity advisory locks are taken shared (in key order) before the
-- level is read: the function is VOLATILE, so at READ COMMITTED each statement takes a new
-- snapshot, after the locks it waited for (the locking protocol of src/store/postgres.rs).
CREATE FUNCTION read_ancestors(p_keys text[], p_lock boolean) RETURNS SETOF entities
LANGUAGE plpgsql VOLATILE SET search_path = lockstep, pg_catalog AS $$
DECLARE
    frontier text[] := ARRAY(SELECT DISTINCT k FROM unnest(p_keys) AS k);
    seen     text[] := frontier;
    nxt      text[];
    k        text;
    ty       text;
    r        entities;
BEGIN
    WHILE cardinality(frontier) > 0 LOOP
        IF p_lock THEN
            PERFORM count(pg_advisory_xact_lock_shared(
                hashtextextended('lockstep' || chr(31) || 'entity' || chr(31) || s.k, 0)))
            FROM (SELECT x AS k FROM unnest(frontier) AS x ORDER BY 1) AS s;
        END IF;
        nxt := '{}';
        FOREACH k IN ARRAY frontier LOOP
            ty := split_part(k, chr(31), 1);
            SELECT * INTO r FROM entities WHERE etype = ty AND eid = substr(k, length(ty) + 2);
            IF FOUND THEN
                RETURN NEXT r;
                nxt := nxt || ARRAY(
                    SELECT (p ->> 'type') || chr(31) || (p ->> 'id') FROM jsonb_array_elements(r.parents::jsonb) AS p);
            END IF;
        END LOOP;
        frontier := ARRAY(SELECT DISTINCT x FROM unnest(nxt) AS x WHERE NOT (x = ANY (seen)));
        seen := seen || frontier;
    END LOOP;
END
$$;
