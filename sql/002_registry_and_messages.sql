-- 002: the tables the seed uses but never defines.

-- agents.registry: the AgentRepository's table (seed 4.1 upserts agent_id, agent_type,
-- status, metadata). version carries the optimistic-concurrency counter.
CREATE TABLE agents.registry (
    agent_id   UUID PRIMARY KEY,
    agent_type VARCHAR(100) NOT NULL,
    status     VARCHAR(20)  NOT NULL DEFAULT 'idle',
    metadata   JSONB        NOT NULL DEFAULT '{}',
    version    BIGINT       NOT NULL DEFAULT 1,
    created_at TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ  NOT NULL DEFAULT now()
);
CREATE INDEX idx_registry_type_status ON agents.registry (agent_type, status);

-- messages.log: communication history (DataType.MESSAGE_LOG). Append-only; seq gives a total
-- order that timestamps cannot (two messages can share a microsecond).
CREATE TABLE messages.log (
    message_id UUID        PRIMARY KEY DEFAULT gen_random_uuid(),
    seq        BIGINT      GENERATED ALWAYS AS IDENTITY UNIQUE,
    agent_id   UUID,
    channel    TEXT        NOT NULL DEFAULT 'default',
    payload    JSONB       NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_log_agent_seq      ON messages.log (agent_id, seq);
CREATE INDEX idx_log_channel_seq    ON messages.log (channel, seq);
CREATE INDEX idx_log_payload_gin    ON messages.log USING gin (payload);
