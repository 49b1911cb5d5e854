-- The reference floor of issue 12: one authorized write with correct locking, in six
-- statements under READ COMMITTED (pgbench -M prepared; schema and locking convention
-- in bench/floor-schema.sql). User u<n> updates its own item i<n> with token jti-<n>.
-- Not Lockstep's statements (those are bench/pgbench-commit.sql): the least a hand-
-- written service must do for the same guarantee. It checks no signing key and no policy
-- version, and has one level of groups.
--
-- Why the token's revocation is read in statement 2 and not beside the lock in
-- statement 1: a READ COMMITTED statement reads with the snapshot it took before it
-- waited for a lock, so a denylist row committed by a revoker (holding the user's row
-- FOR UPDATE) while statement 1 waited would be invisible to statement 1. Statement 2
-- starts after the lock is held: everything it reads can only change after COMMIT.
-- (The subject's own revoked_at is safe in statement 1: a locked row is re-read at its
-- newest version.) The round trips and the reads are the same either way.
\set n random(0, :subjects - 1)
BEGIN;
-- 1. The subject: its row FOR SHARE (its revocations, memberships and grants are frozen).
SELECT (revoked_at IS NULL) AS active FROM users WHERE id = 'u' || :n::text FOR SHARE \gset
-- 2. The token's revocation and the principal's grants on the resource (its own or its groups').
SELECT NOT EXISTS (SELECT 1 FROM denylist WHERE token_id = 'jti-' || :n::text) AS live,
       EXISTS (SELECT 1 FROM grants WHERE resource = 'i' || :n::text
               AND (principal = 'u' || :n::text
                    OR principal IN (SELECT group_id FROM memberships WHERE user_id = 'u' || :n::text))) AS granted \gset
-- 3. The resource FOR UPDATE: its owner and version as they are now.
SELECT owner_id = 'u' || :n::text AS owner, version FROM items WHERE id = 'i' || :n::text FOR UPDATE \gset
\if :active and :live and (:owner or :granted)
-- 4. The write, 5. its audit record, 6. COMMIT.
UPDATE items SET n = n + 1, version = version + 1 WHERE id = 'i' || :n::text;
INSERT INTO audit (principal, token_id, action, resource, version) VALUES ('u' || :n::text, 'jti-' || :n::text, 'UpdateItem', 'i' || :n::text, :version + 1);
COMMIT;
\else
ROLLBACK;
\endif
