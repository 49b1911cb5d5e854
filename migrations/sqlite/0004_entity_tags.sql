-- Cedar entity tags (`hasTag` / `getTag`): a JSON object of Cedar JSON values, like attributes.
ALTER TABLE entities ADD COLUMN tags TEXT NOT NULL DEFAULT '{}';
