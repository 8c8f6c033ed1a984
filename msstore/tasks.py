"""A task queue workers can share: ``tasks.queue`` with leases, retries and LISTEN/NOTIFY.

::

    enqueue ──INSERT … ; pg_notify('msstore_tasks', type)──▶ pending ──▶ (idle workers wake)
                                                               │
    claim   ──one statement: SELECT … ORDER BY priority DESC, created_at
              FOR UPDATE SKIP LOCKED LIMIT n; UPDATE lease─────▶ running (owner, lease_expires_at)
                                                               │
    complete ─owner and live lease?──────────────────────────▶ done
    fail     ─owner and live lease?── attempts left ─────────▶ pending (run_after = backoff)
                                    └ none left ─────────────▶ dead
    the lease runs out (worker crashed) ──────────────────────▶ claimable again (attempt + 1)

Leases and due times use the database clock (``now()``), never a worker's, so workers on
machines whose clocks disagree still agree on who holds a task. A worker that lost its lease
(it ran out, or another worker holds the task now) gets :class:`LeaseLostError` from
``complete``/``fail``/``extend`` and changes nothing. A task past ``expires_at`` is never
claimed; :meth:`TaskQueue.purge_expired` deletes such tasks.

Idle workers do not poll: ``claim(..., wait=s)`` sleeps on a notification that every
``enqueue`` sends in the same statement. What no notification announces — a lease running
out, a ``run_after`` coming due — is found by a slow re-check every ``recheck_interval``
seconds (1 s by default); ``counters`` tells wake-ups by notification from re-checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Final

import asyncpg

from ._check import positive_int, positive_seconds
from ._extras import needs_extra
from ._managed import Managed
from ._pg import pg_errors
from ._task_checks import (
    ClaimedTask,
    TaskStatus,
    check_attempts,
    check_priority,
    check_task_type,
    check_types,
    check_when,
    check_worker,
    claimed_task,
    lease_lost_message,
)
from .codec import MAX_VALUE_BYTES
from .errors import InvalidValueError, LeaseLostError
from .layers._common import check_ttl
from .layers.sql import as_uuid, jsonb
from .layers.tasks import TaskStore

if TYPE_CHECKING:
    import pandas as pd

    from .connection import Connection

#: The channel every enqueue notifies (payload: the task type).
CHANNEL: Final = "msstore_tasks"


_ENQUEUE = f"""
WITH ins AS (
    INSERT INTO tasks.queue AS q (task_id, task_type, payload, priority, max_attempts,
                                  run_after, expires_at, created_at)
    SELECT t.id, $2::text, t.payload, $3::int, $4::int,
           COALESCE($5::timestamptz, now() + make_interval(secs => COALESCE($6::float8, 0))),
           COALESCE($7::timestamptz, now() + make_interval(secs => $8::float8)),
           now() + (t.n - 1) * interval '1 microsecond'  -- a batch keeps its order
    FROM unnest($1::uuid[], $9::jsonb[]) WITH ORDINALITY AS t(id, payload, n)
    RETURNING q.run_after
)
SELECT pg_notify('{CHANNEL}', $2::text) FROM (SELECT min(run_after) AS due FROM ins) d
WHERE d.due <= now()
"""

#: Candidates in the claim index's order, skipping rows other claims hold; a lease that ran
#: out is claimable again, and its crashed attempt counts: past max_attempts it goes dead.
_CLAIM = """
WITH picked AS (
    SELECT task_id FROM tasks.queue
    WHERE ((status = 'pending' AND run_after <= now())
           OR (status = 'running' AND lease_expires_at <= now()))
      AND (expires_at IS NULL OR expires_at > now())
      AND {types}
    ORDER BY priority DESC, created_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE tasks.queue AS q SET
        status = CASE WHEN q.attempts < q.max_attempts THEN 'running' ELSE 'dead' END,
        attempts = LEAST(q.attempts + 1, q.max_attempts),
        lease_owner = CASE WHEN q.attempts < q.max_attempts THEN $1 END,
        lease_expires_at = CASE WHEN q.attempts < q.max_attempts
                                THEN now() + make_interval(secs => $4::float8) END,
        last_error = CASE WHEN q.attempts < q.max_attempts THEN q.last_error
                          ELSE 'the lease of the last attempt ran out' END,
        updated_at = now()
    FROM picked WHERE q.task_id = picked.task_id
    RETURNING q.task_id, q.task_type, q.payload, q.priority, q.attempts, q.max_attempts,
              q.created_at, q.lease_expires_at, q.status
)
SELECT * FROM claimed ORDER BY priority DESC, created_at
"""

#: The claim for any type, for one type (the per-type index, in order), for several types.
CLAIM_SQL = _CLAIM.format(types="$2::text[] IS NULL")
CLAIM_ONE_SQL = _CLAIM.format(types="task_type = ($2::text[])[1]")
CLAIM_SOME_SQL = _CLAIM.format(types="task_type = ANY($2::text[])")

#: Only the owner of a live lease may finish a task; every other call matches no row.
_OWNED = ("task_id = $1 AND status = 'running' AND lease_owner = $2 "
          "AND lease_expires_at > now()")
_COMPLETE = """
UPDATE tasks.queue AS q SET status = 'done', result = t.result, lease_owner = NULL,
       lease_expires_at = NULL, updated_at = now()
FROM unnest($1::uuid[], $3::jsonb[]) AS t(task_id, result)
WHERE q.task_id = ANY($1::uuid[]) AND q.task_id = t.task_id  -- ANY: the primary key
  AND q.status = 'running' AND q.lease_owner = $2 AND q.lease_expires_at > now()
RETURNING q.task_id
"""
_FAIL = f"""
UPDATE tasks.queue SET
    status = CASE WHEN attempts < max_attempts THEN 'pending' ELSE 'dead' END,
    run_after = now() + make_interval(secs => COALESCE(
        $4::float8, LEAST($6::float8, $5::float8 * power(2, attempts - 1)))),
    last_error = $3, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
WHERE {_OWNED} RETURNING status
"""
_EXTEND = f"""
UPDATE tasks.queue SET lease_expires_at = now() + make_interval(secs => $3::float8),
       updated_at = now()
WHERE {_OWNED} RETURNING lease_expires_at
"""
_WHO = """
SELECT task_id, status, lease_owner FROM tasks.queue WHERE task_id = ANY($1::uuid[])
"""
_STATS = """
SELECT task_type, status, count(*) AS tasks, sum(attempts)::bigint AS attempts,
       max(attempts) AS max_attempts,
       count(*) FILTER (WHERE status = 'pending' AND run_after > now()) AS not_due,
       count(*) FILTER (WHERE status = 'running' AND lease_expires_at <= now()) AS lease_run_out,
       count(*) FILTER (WHERE expires_at <= now()) AS expired
FROM tasks.queue
WHERE ($1::text[] IS NULL OR task_type = ANY($1::text[]))
GROUP BY task_type, status ORDER BY task_type, status
"""
_PURGE_FINISHED = """
DELETE FROM tasks.queue WHERE status IN ('done', 'dead')
  AND updated_at <= now() - make_interval(secs => $1::float8)
  AND ($2::text[] IS NULL OR task_type = ANY($2::text[]))
"""


class TaskQueue(Managed):
    """Enqueue, claim with a lease, complete / fail / extend; idle workers wait on NOTIFY.

    One queue per process is enough: it holds one connection that LISTENs, and any number of
    worker coroutines may share it (``worker_id`` names who holds a lease, not the queue).
    ``retry_base``/``retry_max``: a failure without ``retry_in`` is retried after
    ``retry_base * 2**(attempt-1)`` seconds, at most ``retry_max``.
    """

    _usage: ClassVar[str] = "`async with msstore.TaskQueue(ms) as queue`"

    def __init__(self, ms: Connection, *, recheck_interval: float = 1.0,
                 retry_base: float = 1.0, retry_max: float = 300.0,
                 max_value_bytes: int = MAX_VALUE_BYTES) -> None:
        self.ms = ms
        self._pool: asyncpg.Pool = ms.pool
        self.recheck_interval = positive_seconds("recheck_interval", recheck_interval)
        self.retry_base = positive_seconds("retry_base", retry_base)
        self.retry_max = positive_seconds("retry_max", retry_max)
        self.max_value_bytes = positive_int("max_value_bytes", max_value_bytes)
        #: notifications received; idle claims that one woke (or that saw one arrive while
        #: they ran) and claims the re-check repeated instead; statements; tasks leased;
        #: tasks buried as dead because the lease of their last attempt ran out
        self.counters: dict[str, int] = dict.fromkeys(
            ("notifications", "wakeups", "rechecks", "claims", "claimed", "buried"), 0)
        #: bumped by every notification, so a claim can tell one arrived while it ran
        self._generation = 0
        #: idle claims, oldest first: (their task types or None for any, their wake-up)
        self._waiters: deque[tuple[frozenset[str] | None, asyncio.Future[None]]] = deque()
        self._listener: asyncpg.pool.PoolConnectionProxy[Any] | None = None

    # -- life ---------------------------------------------------------------------------------
    async def _start(self) -> None:
        await self._listen()

    async def _close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None and not listener.is_closed():
            with pg_errors("closing the task queue's listener"):
                await listener.remove_listener(CHANNEL, self._on_notify)
                await self._pool.release(listener)

    async def _listen(self) -> None:
        with pg_errors("listening for new tasks"):
            listener = await self._pool.acquire()
            try:
                await listener.add_listener(CHANNEL, self._on_notify)
            except BaseException:
                await self._pool.release(listener)
                raise
        listener.add_termination_listener(self._on_lost)
        self._listener = listener

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self.counters["notifications"] += 1
        self._generation += 1
        self._wake_one(frozenset([payload]) if isinstance(payload, str) else None)

    def _wake_one(self, kinds: frozenset[str] | None) -> None:
        """Wake the oldest idle claim that takes one of ``kinds`` (None: any).

        One, not all: waking every idle coroutine of the process for one new task sends them
        all to PostgreSQL for it. A claim that comes back with a full batch wakes the next
        one (there may be more), so a large enqueue still fans out to every idle worker.
        """
        for i, (types, future) in enumerate(self._waiters):
            if not future.done() and (types is None or kinds is None or types & kinds):
                del self._waiters[i]
                future.set_result(None)
                return

    def _on_lost(self, conn: object) -> None:
        self._listener = None  # the next wait listens again; the re-checks cover the gap

    # -- producers ----------------------------------------------------------------------------
    async def enqueue(self, task_type: str, payload: Any, *, priority: int = 0,
                      expires_at: datetime | None = None, ttl: float | None = None,
                      max_attempts: int = 5, run_after: datetime | float | None = None) -> str:
        """Add one task; return its id. ``run_after``: an aware datetime or seconds from now."""
        return (await self.enqueue_many(task_type, [payload], priority=priority,
                                        expires_at=expires_at, ttl=ttl,
                                        max_attempts=max_attempts, run_after=run_after))[0]

    async def enqueue_many(self, task_type: str, payloads: Iterable[Any], *, priority: int = 0,
                           expires_at: datetime | None = None, ttl: float | None = None,
                           max_attempts: int = 5, run_after: datetime | float | None = None
                           ) -> list[str]:
        """Add one task per payload in one statement (and one notification); return the ids."""
        self._check_open()
        task_type = check_task_type(task_type)
        if isinstance(payloads, str | bytes) or not isinstance(payloads, Iterable):
            raise InvalidValueError(f"payloads must be an iterable of task payloads, got "
                                    f"{type(payloads).__name__}")
        encoded = [jsonb(p, self.max_value_bytes) for p in payloads]
        if expires_at is not None and ttl is not None:
            raise InvalidValueError("give either expires_at or ttl, not both")
        expires, _ = check_when("expires_at", expires_at)
        due_at, due_in = check_when("run_after", run_after)
        args = (task_type, check_priority(priority), check_attempts(max_attempts), due_at,
                due_in, expires, check_ttl(ttl), encoded)
        ids = [uuid.uuid4() for _ in encoded]
        if ids:
            with pg_errors(f"enqueueing {len(ids)} {task_type} task(s)"):
                await self._pool.execute(_ENQUEUE, ids, *args)
        return [str(i) for i in ids]

    # -- workers ------------------------------------------------------------------------------
    async def claim(self, worker_id: str, *, types: Sequence[str] | None = None, limit: int = 1,
                    lease: float = 30.0, wait: float | None = None) -> list[ClaimedTask]:
        """Lease up to ``limit`` claimable tasks to ``worker_id`` for ``lease`` seconds.

        Highest priority first, then oldest. Never an expired task, one not yet due, or one
        whose lease is live. With ``wait`` seconds, an empty queue is waited on (woken by the
        next enqueue's notification, re-checked every ``recheck_interval``); ``[]`` after
        ``wait`` seconds without a task.
        """
        self._check_open()
        worker_id = check_worker(worker_id)
        kinds = check_types(types)
        limit = positive_int("limit", limit)
        lease = positive_seconds("lease", lease)
        loop = asyncio.get_running_loop()
        deadline = None if wait is None else loop.time() + positive_seconds("wait", wait)
        wanted = None if kinds is None else frozenset(kinds)
        while True:
            generation = self._generation  # before the claim: a notify during it counts
            rows = await self._claim_once(worker_id, kinds, limit, lease)
            tasks = [claimed_task(r) for r in rows if r["status"] == TaskStatus.RUNNING]
            if len(rows) == limit:
                self._wake_one(wanted)  # a full batch: there may be more, pass it on
            if tasks or deadline is None:
                return tasks
            if len(rows) > len(tasks):
                continue  # the picked rows were buried as dead: look again at once
            if generation != self._generation:
                self.counters["wakeups"] += 1  # a notification came during the claim
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            if self._listener is None:
                await self._listen_quietly()
            if await self._idle(wanted, min(remaining, self.recheck_interval)):
                self.counters["wakeups"] += 1
            else:
                self.counters["rechecks"] += 1

    async def _idle(self, wanted: frozenset[str] | None, seconds: float) -> bool:
        """Wait to be woken by a notification (True) or for ``seconds`` (False)."""
        entry = (wanted, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            done, _ = await asyncio.wait({entry[1]}, timeout=seconds)
        except asyncio.CancelledError:
            if entry[1].done():
                self._wake_one(wanted)  # woken, but never claims: pass the wake-up on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
        return bool(done)

    async def _claim_once(self, worker_id: str, kinds: list[str] | None, limit: int,
                          lease: float) -> list[asyncpg.Record]:
        with pg_errors(f"claiming tasks for {worker_id}"):
            sql = CLAIM_SQL if kinds is None else CLAIM_ONE_SQL if len(kinds) == 1 \
                else CLAIM_SOME_SQL
            rows = await self._pool.fetch(sql, worker_id, kinds, limit, lease)
        self.counters["claims"] += 1
        buried = sum(r["status"] == TaskStatus.DEAD for r in rows)
        self.counters["claimed"] += len(rows) - buried
        self.counters["buried"] += buried
        return rows

    async def _listen_quietly(self) -> None:
        try:
            await self._listen()
        except Exception:  # PostgreSQL away: the re-checks (and their errors) go on
            pass

    async def complete(self, task_id: str | uuid.UUID, worker_id: str,
                       result: Any = None) -> None:
        """Mark a task done with an optional JSON ``result``; only with a live lease."""
        await self.complete_many(worker_id, [task_id], None if result is None else [result])

    async def complete_many(self, worker_id: str, task_ids: Sequence[str | uuid.UUID],
                            results: Sequence[Any] | None = None) -> None:
        """Mark many tasks done in one statement (one commit: a batch's worth of fsyncs saved).

        Each task is judged alone: those whose live lease ``worker_id`` holds are done; the
        others are left as they are and named by the :class:`LeaseLostError` raised after.
        """
        self._check_open()
        worker_id = check_worker(worker_id)
        tids = [as_uuid(t, "a task id") for t in task_ids]
        if results is None:
            values: list[Any] = [None] * len(tids)
        elif len(results) != len(tids):
            raise InvalidValueError(f"complete_many got {len(results)} results for "
                                    f"{len(tids)} task ids; give one per task (or None)")
        else:
            values = [None if r is None else jsonb(r, self.max_value_bytes) for r in results]
        if not tids:
            return
        with pg_errors(f"completing {len(tids)} task(s) for {worker_id}"):
            done = {r["task_id"] for r in await self._pool.fetch(_COMPLETE, tids, worker_id,
                                                                  values)}
            refused = [t for t in dict.fromkeys(tids) if t not in done]
            if not refused:
                return
            who = {r["task_id"]: r for r in await self._pool.fetch(_WHO, refused)}
        raise LeaseLostError(
            "; ".join(lease_lost_message("completing", t, worker_id, who.get(t))
                      for t in refused[:3]) + (f" (and {len(refused) - 3} more)"
                                               if len(refused) > 3 else ""),
            [str(t) for t in refused])

    async def fail(self, task_id: str | uuid.UUID, worker_id: str, error: str, *,
                   retry_in: float | None = None) -> TaskStatus:
        """Record a failed attempt: ``pending`` again after a backoff, or ``dead`` when it was
        the last of ``max_attempts``. Returns the task's new status."""
        self._check_open()
        tid = as_uuid(task_id, "a task id")
        if not isinstance(error, str):
            raise InvalidValueError(f"error must be a str (what went wrong), got {error!r}")
        if retry_in is not None and (isinstance(retry_in, bool)
                                     or not isinstance(retry_in, int | float)
                                     or not 0 <= retry_in < 1e9):
            raise InvalidValueError(f"retry_in must be seconds >= 0 or None (the backoff), "
                                    f"got {retry_in!r}")
        row = await self._owned(_FAIL, "failing", tid, check_worker(worker_id), error[:10_000],
                                retry_in, self.retry_base, self.retry_max)
        return TaskStatus(row["status"])

    async def extend(self, task_id: str | uuid.UUID, worker_id: str, lease: float) -> datetime:
        """Renew a live lease to ``lease`` seconds from now; return the new expiry."""
        self._check_open()
        tid = as_uuid(task_id, "a task id")
        row = await self._owned(_EXTEND, "extending the lease of", tid, check_worker(worker_id),
                                positive_seconds("lease", lease))
        return row["lease_expires_at"]  # type: ignore[no-any-return]

    async def _owned(self, sql: str, what: str, tid: uuid.UUID, worker_id: str,
                     *args: Any) -> asyncpg.Record:
        with pg_errors(f"{what} task {tid}"):
            row = await self._pool.fetchrow(sql, tid, worker_id, *args)
            if row is not None:
                return row
            who = await self._pool.fetchrow(_WHO, [tid])
        raise LeaseLostError(lease_lost_message(what, tid, worker_id, who), [str(tid)])

    # -- operators ----------------------------------------------------------------------------
    async def purge_expired(self) -> int:
        """Delete every task past its ``expires_at`` (a live lease keeps one); how many."""
        self._check_open()
        return await TaskStore(self._pool).purge_expired()

    async def purge_finished(self, older_than: float = 0.0, *,
                             types: Sequence[str] | None = None) -> int:
        """Delete ``done`` and ``dead`` tasks last changed ``older_than`` seconds ago or more."""
        self._check_open()
        _, seconds = check_when("older_than", older_than)
        with pg_errors("purging finished tasks"):
            status = await self._pool.execute(_PURGE_FINISHED, seconds, check_types(types))
        return int(status.split()[-1])

    async def stats(self, types: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per (task_type, status): tasks, attempts (sum and max), how many are not
        yet due, hold a lease that ran out, or are past ``expires_at``."""
        self._check_open()
        with needs_extra("TaskQueue.stats()"):
            import pandas as pd
        with pg_errors("reading the queue's statistics"):
            rows = await self._pool.fetch(_STATS, check_types(types))
        columns = ["task_type", "status", "tasks", "attempts", "max_attempts", "not_due",
                   "lease_run_out", "expired"]
        return pd.DataFrame([dict(r) for r in rows], columns=columns)


__all__ = ["CHANNEL", "ClaimedTask", "TaskQueue", "TaskStatus"]
