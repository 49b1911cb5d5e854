-- One AuthorizeAndCommit as the PostgreSQL store issues it (src/store/postgres.rs):
-- user u<n> updates its own item i<n>, one mutation, no idempotency key, policy set
-- cached (JSON built with json_build_object: pgbench reads `:` as a variable). Kept in step with the store by tests/it/bench_sql.rs, which compares the
-- statements below with the ones in the store's source.
\set n random(0, :subjects - 1)
BEGIN;
SELECT * FROM keys WHERE kid = 'bench';
SELECT * FROM call_state_locked('User', 'u' || :n::text, 'jti-' || :n::text);
SELECT etype, eid, attributes, parents, version, tags FROM read_entity_locked('Item', 'i' || :n::text);
SELECT etype, eid, attributes, parents, version, tags FROM read_ancestors(ARRAY['User' || chr(31) || 'u' || :n::text], true);
UPDATE entities SET attributes = json_build_object('hot', false, 'n', 1, 'owner', json_build_object('__entity', json_build_object('id', 'u' || :n::text, 'type', 'User')))::text, parents = '[]', version = version + 1, tags = '{}' WHERE etype = 'Item' AND eid = 'i' || :n::text;
INSERT INTO audit (time, kind, principal_type, principal_id, token_id, mutations, entities, detail) VALUES (0, 1, 'User', 'u' || :n::text, 'jti-' || :n::text, json_build_array(json_build_object('action', 'UpdateItem', 'resource', json_build_object('type', 'Item', 'id', 'i' || :n::text), 'change', json_build_object('kind', 'update', 'merge_patch', json_build_object('n', 1), 'add_parents', json_build_array(), 'remove_parents', json_build_array()), 'if_version', NULL))::text, json_build_array(json_build_object('uid', json_build_object('type', 'Item', 'id', 'i' || :n::text), 'attributes', json_build_object('hot', false, 'n', 1), 'parents', json_build_array(), 'version', 2))::text, '') RETURNING seq, pg_current_xact_id()::text, pg_backend_pid();
COMMIT;
