-- Keys from JWKS, first-party rotation, and per-key token rules.
ALTER TABLE keys ADD COLUMN jwk TEXT NOT NULL DEFAULT '';            -- the JWK, for keys from a JWKS
ALTER TABLE keys ADD COLUMN source TEXT NOT NULL DEFAULT '';         -- '' (added), a JWKS URL, or 'jwks-file'
ALTER TABLE keys ADD COLUMN retired INTEGER NOT NULL DEFAULT 0;      -- gone from its JWKS: no longer verifies
ALTER TABLE keys ADD COLUMN required_typ TEXT NOT NULL DEFAULT '';   -- e.g. at+jwt (RFC 9068); '' not checked
ALTER TABLE keys ADD COLUMN max_lifetime_secs INTEGER NOT NULL DEFAULT 0; -- exp - iat at most; 0 not checked
ALTER TABLE keys ADD COLUMN signing INTEGER NOT NULL DEFAULT 0;      -- the current first-party signing key
ALTER TABLE keys ADD COLUMN private_key BLOB NOT NULL DEFAULT x'';   -- PKCS#8, first-party asymmetric keys only
