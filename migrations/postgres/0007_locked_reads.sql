-- Lock, then read, in one round trip. Both functions are VOLATILE: at READ COMMITTED each
-- statement inside them takes a new snapshot, so the read sees everything committed by the
-- holders the lock waited for (the locking protocol of src/store/postgres.rs, unchanged).

-- The call state of a write transaction: the subject's lock and its principal entity's
-- (shared), then the subject's and the token's revocation and the policy state.
CREATE FUNCTION call_state_locked(p_etype text, p_eid text, p_token text)
RETURNS TABLE (revoked_at_secs bigint, token_revoked boolean, version bigint, generation bigint)
LANGUAGE plpgsql VOLATILE SET search_path = lockstep, pg_catalog AS $$
BEGIN
    PERFORM count(pg_advisory_xact_lock_shared(hashtextextended(s.k, 0)))
    FROM (SELECT x AS k FROM unnest(ARRAY[
            'lockstep' || chr(31) || 'entity' || chr(31) || p_etype || chr(31) || p_eid,
            'lockstep' || chr(31) || 'subject' || chr(31) || p_etype || chr(31) || p_eid]) AS x ORDER BY 1) AS s;
    RETURN QUERY SELECT
        (SELECT sj.revoked_at_secs FROM subjects sj WHERE sj.etype = p_etype AND sj.eid = p_eid),
        EXISTS (SELECT 1 FROM revoked_tokens rt WHERE rt.token_id = p_token),
        (SELECT max(p.version) FROM policies p),
        (SELECT m.generation FROM policy_links_meta m WHERE m.id = 1);
END
$$;

-- An entity of Lockstep's own store about to be written: its lock exclusive, then the row.
CREATE FUNCTION read_entity_locked(p_etype text, p_eid text) RETURNS SETOF entities
LANGUAGE plpgsql VOLATILE SET search_path = lockstep, pg_catalog AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('lockstep' || chr(31) || 'entity' || chr(31) || p_etype || chr(31) || p_eid, 0));
    RETURN QUERY SELECT * FROM entities WHERE etype = p_etype AND eid = p_eid;
END
$$;
