-- 008: a message log worth paging (msstore.MessageLog, module msstore/messages.py).
--
-- The IDENTITY column seq is drawn when a row is inserted, not when its transaction commits:
-- appender A draws seq 7, appender B draws 8 and commits first, a reader paging "after 6"
-- sees 8, moves its cursor to 8 and never sees 7. So paging does not use seq. Each message
-- gets a per-channel position from a head row per channel, bumped by the append statement
-- itself: the bump locks the head row until the appender commits, so the next appender of
-- that channel waits, and positions become visible in order with no holes. A reader that
-- has seen position p has seen every committed position below p. The same holds per agent
-- (agent_position, from the agent's head row), which orders an agent's conversation across
-- channels. A rolled-back append undoes its bump too, so positions stay gapless; only a
-- removal (retention, remove()) leaves a hole, and holes are never refilled.

CREATE TABLE messages.channel_heads (
    channel       TEXT   PRIMARY KEY,
    last_position BIGINT NOT NULL
);
CREATE TABLE messages.agent_heads (
    agent_id      UUID   PRIMARY KEY,
    last_position BIGINT NOT NULL
);

ALTER TABLE messages.log ADD COLUMN position BIGINT, ADD COLUMN agent_position BIGINT;

-- rows appended before this migration keep their seq order
WITH ranked AS (
    SELECT message_id,
           row_number() OVER (PARTITION BY channel ORDER BY seq) AS p,
           CASE WHEN agent_id IS NOT NULL
                THEN row_number() OVER (PARTITION BY agent_id ORDER BY seq) END AS ap
    FROM messages.log
)
UPDATE messages.log l SET position = r.p, agent_position = r.ap
FROM ranked r WHERE l.message_id = r.message_id;
INSERT INTO messages.channel_heads (channel, last_position)
SELECT channel, max(position) FROM messages.log GROUP BY channel;
INSERT INTO messages.agent_heads (agent_id, last_position)
SELECT agent_id, max(agent_position) FROM messages.log WHERE agent_id IS NOT NULL
GROUP BY agent_id;

ALTER TABLE messages.log ALTER COLUMN position SET NOT NULL;
ALTER TABLE messages.log ADD CONSTRAINT log_agent_position_only_with_agent
    CHECK ((agent_id IS NULL) = (agent_position IS NULL));

-- keyset pages of a channel (after= / before=), retention by count, the latest N
CREATE UNIQUE INDEX idx_log_channel_position ON messages.log (channel, position);
-- keyset pages of an agent's conversation across channels
CREATE UNIQUE INDEX idx_log_agent_position   ON messages.log (agent_id, agent_position);
-- retention by age, per channel
CREATE INDEX idx_log_channel_created         ON messages.log (channel, created_at);
-- replaced by the position indexes above (every query that used them now orders by position)
DROP INDEX messages.idx_log_channel_seq;
DROP INDEX messages.idx_log_agent_seq;
