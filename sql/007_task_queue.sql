-- 007: tasks.queue becomes a queue workers can share (issue 13; msstore.tasks.TaskQueue).
--
-- The seed's status and expires_at columns get what works them: a priority, a due time
-- (run_after), attempts against a bound, and a lease (owner + expiry on the database clock).
-- Statuses: pending -> running -> done, or back to pending (a failure with attempts left, a
-- lease that ran out) until max_attempts, then dead. TaskStore (the DataStorage view of this
-- table) keeps writing the seed's columns; its rows get the defaults below.

ALTER TABLE tasks.queue
    ADD COLUMN priority         INTEGER     NOT NULL DEFAULT 0,
    ADD COLUMN run_after        TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN attempts         INTEGER     NOT NULL DEFAULT 0,
    ADD COLUMN max_attempts     INTEGER     NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    ADD COLUMN lease_owner      TEXT,
    ADD COLUMN lease_expires_at TIMESTAMPTZ,
    ADD COLUMN last_error       TEXT,
    ADD COLUMN result           JSONB,
    ADD COLUMN updated_at       TIMESTAMPTZ NOT NULL DEFAULT now();

-- The claim scans one of these in its ORDER BY (highest priority, then oldest) and stops at
-- the LIMIT: the first for a claim of any type, the second for a claim of one type (without
-- it, that claim would walk past every other type's backlog). Both hold only the rows a claim
-- can ever want, so finished tasks cost them nothing.
-- (No task_id tiebreaker: enqueue_many gives each task of a batch its own created_at, and a
-- task_id here would tempt the planner to look tasks up by id through these instead of the
-- primary key.)
CREATE INDEX idx_queue_claim ON tasks.queue (priority DESC, created_at)
    WHERE status IN ('pending', 'running');
CREATE INDEX idx_queue_claim_type ON tasks.queue (task_type, priority DESC, created_at)
    WHERE status IN ('pending', 'running');
