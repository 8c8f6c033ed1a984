-- 005: tombstones for deletes in agents.state (write-behind correctness).
--
-- The flush's version guard (`WHERE state.version < excluded.version`) keeps an older value
-- from overwriting a newer one, but a DELETE leaves no row to compare with: an older upsert
-- that reaches PostgreSQL after a newer delete (a JetStream redelivery once ack_wait ran out,
-- or a second flusher process sharing the consumer) re-created the deleted row. The merge
-- statement (msstore.hybrid.MERGE_SQL) now records each delete's KV revision here, refuses
-- upserts older than it, and clears the tombstone when a newer upsert lands. The flusher purges
-- tombstones older than its retention (no message that old can still be delivered).

CREATE TABLE agents.state_tombstones (
    agent_id   UUID        NOT NULL,
    key        TEXT        NOT NULL,
    version    BIGINT      NOT NULL,
    deleted_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, key)
);
CREATE INDEX idx_state_tombstones_deleted ON agents.state_tombstones (deleted_at);
