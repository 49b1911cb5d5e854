-- One AuthorizeAndCommit as the PostgreSQL store issues it (src/store/postgres/txn.rs):
-- user u<n> updates its own item i<n>, one mutation, no idempotency key, token verified
-- before, policy set cached, and everything it is decided on seen before by this instance
-- (a speculative write, the steady state of a user writing: see "One round trip" in the
-- store's module doc). One round trip: BEGIN, the locks, the statement that checks what the
-- write was decided on and, when it holds, updates the entity and inserts the audit row
-- (JSON built with json_build_object: pgbench reads `:` as a variable), and COMMIT. The
-- store sends the entities' text as it saw them; here the item's is read by a subquery (it
-- changes with every write): two index lookups more than the store's. A write seen stale
-- or not seen before takes two round trips (the read first), as before.
-- Kept in step with the store by tests/it/bench_sql.rs, which compares the statements
-- below with the store's source. pgbench -M prepared (pipelines need the extended protocol),
-- plan_cache_mode=force_generic_plan as the store's connections.
\set n random(0, :subjects - 1)
\startpipeline
BEGIN;
SELECT pg_advisory_xact_lock_shared(hashtextextended('lockstep' || chr(31) || 'entity' || chr(31) || 'User' || chr(31) || 'u' || :n::text, 0)), pg_advisory_xact_lock_shared(hashtextextended('lockstep' || chr(31) || 'subject' || chr(31) || 'User' || chr(31) || 'u' || :n::text, 0)), pg_advisory_xact_lock(hashtextextended('lockstep' || chr(31) || 'entity' || chr(31) || 'Item' || chr(31) || 'i' || :n::text, 0));
WITH ok AS (SELECT (SELECT hashtextextended(k::text, 0) FROM keys k WHERE k.kid = 'bench') IS NOT DISTINCT FROM (SELECT hashtextextended(k::text, 0) FROM keys k WHERE k.kid = 'bench') AND (SELECT revoked_at_secs FROM subjects WHERE etype = 'User' AND eid = 'u' || :n::text) IS NOT DISTINCT FROM NULL AND NOT EXISTS (SELECT 1 FROM revoked_tokens WHERE token_id = 'jti-' || :n::text) AND (SELECT max(version) FROM policies) IS NOT DISTINCT FROM 1 AND (SELECT generation FROM policy_links_meta WHERE id = 1) IS NOT DISTINCT FROM 0 AND coalesce((SELECT true AND e.attributes = (SELECT attributes FROM entities WHERE etype = 'Item' AND eid = 'i' || :n::text) AND e.parents = '[]' AND e.version = (SELECT version FROM entities WHERE etype = 'Item' AND eid = 'i' || :n::text) AND e.tags = '{}' FROM entities e WHERE e.etype = 'Item' AND e.eid = 'i' || :n::text), false) AND coalesce((SELECT true AND e.attributes = '{}' AND e.parents = '[]' AND e.version = 1 AND e.tags = '{}' FROM entities e WHERE e.etype = 'User' AND e.eid = 'u' || :n::text), false) AS ok), u AS (UPDATE entities SET attributes = json_build_object('hot', false, 'n', 1, 'owner', json_build_object('__entity', json_build_object('id', 'u' || :n::text, 'type', 'User')))::text, parents = '[]', version = version + 1, tags = '{}' WHERE etype = 'Item' AND eid = 'i' || :n::text AND (SELECT ok FROM ok) RETURNING 1) INSERT INTO audit (time, kind, principal_type, principal_id, token_id, mutations, entities, detail, nonce) SELECT 0, 1, 'User', 'u' || :n::text, 'jti-' || :n::text, json_build_array(json_build_object('action', 'UpdateItem', 'resource', json_build_object('type', 'Item', 'id', 'i' || :n::text), 'change', json_build_object('kind', 'update', 'merge_patch', json_build_object('n', 1))))::text, json_build_array(json_build_object('uid', json_build_object('type', 'Item', 'id', 'i' || :n::text), 'attributes', json_build_object('hot', false, 'n', 1), 'version', 2))::text, '', 1 WHERE (SELECT ok FROM ok) RETURNING seq, pg_current_xact_id()::text, pg_backend_pid(), 1 / (SELECT count(*) FROM u);
COMMIT;
\endpipeline
