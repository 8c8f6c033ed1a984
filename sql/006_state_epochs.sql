-- 006: a version is a sequence of one stream incarnation; record which one (issue 10).
--
-- agents.state.version is the KV revision, i.e. the bucket stream's sequence number. Delete
-- and recreate the bucket (or restore it) and sequences restart at 1: the guard
-- `state.version < excluded.version` then skipped every acknowledged write of the new
-- incarnation against the old rows. `epoch` names the incarnation (the stream's creation time
-- in microseconds since 1970). The merge (msstore.merge.MERGE_SQL) orders two changes by
-- version only when their epochs are equal; a change from another incarnation is newer
-- news and wins. 0 means "unknown" (rows written before this migration): such rows keep
-- comparing by version, so a redelivery right after the upgrade cannot roll a row back.

ALTER TABLE agents.state ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE agents.state_tombstones ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
