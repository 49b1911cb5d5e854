-- Authorize in one statement (issue 12): a read-only decision's first statement may run
-- alone, without BEGIN, when it reads everything the decision needs. A statement has one
-- snapshot, and a STABLE function sees the snapshot of the statement that calls it (a
-- VOLATILE one takes a fresh snapshot per query it runs): so the principal's and the
-- resource's ancestors are read here by a STABLE copy of `read_ancestors` without its locks
-- (a read-only decision takes none).
CREATE FUNCTION lockstep.read_ancestors_at(p_keys text[]) RETURNS SETOF lockstep.entities
LANGUAGE plpgsql STABLE AS $$
DECLARE
    frontier text[];
    seen     text[];
    nxt      text[];
    k        text;
    ty       text;
    r        lockstep.entities;
BEGIN
    IF cardinality(p_keys) <= 1 THEN
        frontier := coalesce(p_keys, '{}');
    ELSE
        frontier := ARRAY(SELECT DISTINCT x FROM unnest(p_keys) AS x);
    END IF;
    seen := frontier;
    WHILE cardinality(frontier) > 0 LOOP
        nxt := '{}';
        FOREACH k IN ARRAY frontier LOOP
            ty := split_part(k, chr(31), 1);
            SELECT * INTO r FROM lockstep.entities e WHERE e.etype = ty AND e.eid = substr(k, length(ty) + 2);
            IF FOUND THEN
                RETURN NEXT r;
                IF r.parents <> '[]' THEN
                    nxt := nxt || ARRAY(
                        SELECT (p ->> 'type') || chr(31) || (p ->> 'id') FROM jsonb_array_elements(r.parents::jsonb) AS p);
                END IF;
            END IF;
        END LOOP;
        EXIT WHEN cardinality(nxt) = 0;
        frontier := ARRAY(SELECT DISTINCT x FROM unnest(nxt) AS x WHERE NOT (x = ANY (seen)));
        seen := seen || frontier;
    END LOOP;
END
$$;
