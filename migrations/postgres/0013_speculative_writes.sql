-- Speculative writes (issue 12): a lone update decided on what the instance last saw
-- committed is sent in one round trip — BEGIN, its locks, the write and COMMIT. When every
-- answer is lost with the connection, its transaction id is unknown, so its audit row
-- carries a random nonce by which the settling connection finds it (among the rows after an
-- audit seq seen before the write began). NULL for every other event; not part of the API.
ALTER TABLE lockstep.audit ADD COLUMN nonce BIGINT;

