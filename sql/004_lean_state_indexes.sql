-- 004: less index maintenance on agents.state, the table every flush writes (issue 6).
--
-- 1. idx_state_key_btree (from the seed, kept by 001) is an exact duplicate of the primary
--    key's btree on (agent_id, key): every insert and update wrote both, and no query can use
--    it that the primary key does not serve.
-- 2. The GIN index on value moves from the default jsonb_ops to jsonb_path_ops: one hashed
--    entry per path-to-value instead of one per key and one per value, so every write adds
--    fewer entries and the index is smaller. The two changes make a 10,000-row flush about a
--    third faster (`msstore bench --only 1`; notebook 07). It still answers what msstore's
--    searches use, containment (@>), and the jsonpath operators @? and @@ where the path
--    tests values. It no longer answers key existence (?, ?|, ?&): those still work, as a
--    filter on the rows another condition found (notebook 02 shows the plans). A deployment
--    that searches by key existence on its own adds a jsonb_ops index in a migration of its own.
--
-- The index keeps its name: plans and gin_clean_pending_list() calls refer to the same index.
-- Building it takes a lock that blocks writes to agents.state until it is done, once.

DROP INDEX IF EXISTS agents.idx_state_key_btree;
DROP INDEX IF EXISTS agents.idx_state_value_gin;
CREATE INDEX idx_state_value_gin ON agents.state USING gin (value jsonb_path_ops);
