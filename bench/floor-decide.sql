-- The read-only decision of issue 12 (the floor of Authorize): may user u<n>, holding
-- token jti-<n>, update item i<n>? One REPEATABLE READ snapshot, so that the three reads
-- are one consistent state (Lockstep's Authorize reads in REPEATABLE READ too).
-- Schema: bench/floor-schema.sql. pgbench -M prepared.
\set n random(0, :subjects - 1)
BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
-- The subject and the token's revocation.
SELECT u.revoked_at IS NULL AS active, NOT EXISTS (SELECT 1 FROM denylist WHERE token_id = 'jti-' || :n::text) AS live
  FROM users u WHERE u.id = 'u' || :n::text;
-- The principal's grants on the resource (its own or its groups').
SELECT EXISTS (SELECT 1 FROM grants WHERE resource = 'i' || :n::text
               AND (principal = 'u' || :n::text
                    OR principal IN (SELECT group_id FROM memberships WHERE user_id = 'u' || :n::text))) AS granted;
-- The resource.
SELECT owner_id, version FROM items WHERE id = 'i' || :n::text;
COMMIT;
