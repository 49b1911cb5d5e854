-- The reference floor's own small schema (issue 12): what a hand-written service that
-- authorizes its writes correctly keeps. Seeded like `lockstep bench`'s data: user u<N>
-- owns item i<N> (N < :subjects), and holds token jti-<N>; every call is uncontended.
-- Load with: psql -v subjects=1000 -f bench/floor-schema.sql DB
--
-- Who may change what (the locking convention the floor scripts rely on): a user's
-- revoked_at, a denylist entry for one of its tokens, its memberships and the grants it
-- holds change only under that user's row FOR UPDATE (for a group's grants: the rows of
-- the group's members); an item's owner changes under the item's row FOR UPDATE.
DROP TABLE IF EXISTS audit, grants, memberships, denylist, items, users;

CREATE TABLE users (
  id text PRIMARY KEY,
  revoked_at timestamptz            -- every token of the user revoked (logout everywhere)
);
CREATE TABLE denylist (             -- revoked tokens, by jti (logout of one token)
  token_id text PRIMARY KEY,
  revoked_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE memberships (          -- one level of groups
  user_id text NOT NULL REFERENCES users (id),
  group_id text NOT NULL,
  PRIMARY KEY (user_id, group_id)
);
CREATE TABLE grants (               -- principal (a user or a group) may update resource
  resource text NOT NULL,
  principal text NOT NULL,
  PRIMARY KEY (resource, principal)
);
CREATE TABLE items (
  id text PRIMARY KEY,
  owner_id text NOT NULL REFERENCES users (id),
  n bigint NOT NULL DEFAULT 0,
  version bigint NOT NULL DEFAULT 1
);
CREATE TABLE audit (
  seq bigserial PRIMARY KEY,
  at timestamptz NOT NULL DEFAULT now(),
  principal text NOT NULL,
  token_id text NOT NULL,
  action text NOT NULL,
  resource text NOT NULL,
  version bigint NOT NULL
);

INSERT INTO users (id) SELECT 'u' || g FROM generate_series(0, :subjects - 1) g;
-- A few users revoked and old tokens denied, so that neither check reads an empty table.
INSERT INTO users (id, revoked_at) VALUES ('x-revoked', now());
INSERT INTO denylist (token_id) SELECT 'jti-old-' || g FROM generate_series(0, :subjects - 1, 10) g;
INSERT INTO memberships (user_id, group_id) SELECT 'u' || g, 'g' || (g % 10) FROM generate_series(0, :subjects - 1) g;
INSERT INTO items (id, owner_id) SELECT 'i' || g, 'u' || g FROM generate_series(0, :subjects - 1) g;
-- Editors: u<N> may also update its neighbour's item; groups may update shared items.
INSERT INTO grants (resource, principal) SELECT 'i' || ((g + 1) % :subjects), 'u' || g FROM generate_series(0, :subjects - 1) g;
INSERT INTO items (id, owner_id) SELECT 'shared' || g, 'u0' FROM generate_series(0, 9) g;
INSERT INTO grants (resource, principal) SELECT 'shared' || g, 'g' || g FROM generate_series(0, 9) g;
VACUUM ANALYZE;
CHECKPOINT;
