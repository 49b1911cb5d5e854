-- The one-statement floor of issue 12: the work of bench/floor-commit.sql (subject and
-- token revocation, grants, owner, write, audit record) as one statement in its own
-- transaction — one round trip. pgbench -M prepared; schema: bench/floor-schema.sql.
--
-- NOT SAFE under READ COMMITTED (a floor for the cost, not a pattern to copy): the
-- statement reads the denylist, the grants and the memberships with the one snapshot it
-- took before waiting for any lock, so a revocation or a grant removal that commits
-- while it waits (on the user's row or the item's) still lets its write land.
\set n random(0, :subjects - 1)
WITH subject AS (
  SELECT 1 FROM users u
   WHERE u.id = 'u' || :n::text AND u.revoked_at IS NULL
     AND NOT EXISTS (SELECT 1 FROM denylist WHERE token_id = 'jti-' || :n::text)
     FOR SHARE OF u
), written AS (
  UPDATE items i SET n = i.n + 1, version = i.version + 1
   WHERE i.id = 'i' || :n::text AND EXISTS (SELECT 1 FROM subject)
     AND (i.owner_id = 'u' || :n::text
          OR EXISTS (SELECT 1 FROM grants WHERE resource = i.id
                     AND (principal = 'u' || :n::text
                          OR principal IN (SELECT group_id FROM memberships WHERE user_id = 'u' || :n::text))))
  RETURNING i.id, i.version
)
INSERT INTO audit (principal, token_id, action, resource, version)
SELECT 'u' || :n::text, 'jti-' || :n::text, 'UpdateItem', id, version FROM written;
