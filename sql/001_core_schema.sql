-- 001: the seed's section 2 in full (schemas, agents.state with its three indexes,
-- tasks.queue, agents.checkpoints, hydrate_agent_state).
-- Deviation from the seed, on purpose: timestamps are TIMESTAMPTZ (a TIMESTAMP without zone
-- silently changes meaning with the session's TimeZone setting).

CREATE SCHEMA IF NOT EXISTS agents;
CREATE SCHEMA IF NOT EXISTS tasks;
CREATE SCHEMA IF NOT EXISTS messages;

-- Agent state: one row per (agent, key). version is the NATS KV revision of the value, so a
-- flush can refuse to overwrite a newer row with an older revision.
CREATE TABLE agents.state (
    agent_id   UUID        NOT NULL,
    key        TEXT        NOT NULL,
    value      JSONB       NOT NULL,
    version    BIGINT      NOT NULL DEFAULT 1,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, key)
);

-- The seed's three indexes. idx_state_key_btree duplicates the primary key's own index; it is
-- kept because the seed defines it, and notebook 02 shows the planner choosing between them.
CREATE INDEX idx_state_value_gin  ON agents.state USING gin (value);
CREATE INDEX idx_state_key_btree  ON agents.state (agent_id, key);
CREATE INDEX idx_state_updated    ON agents.state (updated_at);

-- Task tracking with metadata; expires_at is an optional TTL honoured on read.
CREATE TABLE tasks.queue (
    task_id    UUID PRIMARY KEY,
    task_type  VARCHAR(50),
    payload    JSONB,
    metadata   JSONB       NOT NULL DEFAULT '{}',
    status     VARCHAR(20) NOT NULL DEFAULT 'pending',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ
);
CREATE INDEX idx_queue_status_created ON tasks.queue (status, created_at);

-- Checkpoints for recovery: a JSONB snapshot and the KV revision it corresponds to.
CREATE TABLE agents.checkpoints (
    agent_id       UUID        NOT NULL,
    checkpoint_id  UUID        NOT NULL DEFAULT gen_random_uuid(),
    state_snapshot JSONB       NOT NULL,
    kv_revision    BIGINT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, checkpoint_id)
);
CREATE INDEX idx_checkpoints_agent_created ON agents.checkpoints (agent_id, created_at DESC);

-- Hydration query for agent startup (seed 2.2).
CREATE FUNCTION agents.hydrate_agent_state(p_agent_id UUID)
RETURNS TABLE (key TEXT, value JSONB) AS $$
BEGIN
    RETURN QUERY
    SELECT s.key, s.value
    FROM agents.state s
    WHERE s.agent_id = p_agent_id
    ORDER BY s.updated_at DESC;
END;
$$ LANGUAGE plpgsql STABLE;
