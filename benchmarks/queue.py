"""#7 ``msstore.TaskQueue`` vs pgqueuer, on the same PostgreSQL, same workers, same run.

pgqueuer (PyPI ``pgqueuer``) is the baseline because it is the PostgreSQL queue that users of
*asyncpg* pick: it runs on asyncpg natively (``AsyncpgDriver``), as msstore does, so the two
differ in their queue design and not in their database driver; it claims batches with
``FOR UPDATE SKIP LOCKED`` and wakes idle workers with LISTEN/NOTIFY, like msstore.
(procrastinate, the other well-known one, needs psycopg 3: a second driver in the race.)

Each side gets ``queue_workers`` workers in this process — msstore: that many coroutines
claiming ``queue_batch`` tasks at a time from one :class:`TaskQueue`, running them, then
completing the batch with one ``complete_many``;
pgqueuer: that many ``QueueManager`` s, one asyncpg connection each, ``batch_size`` the same
(pgqueuer buffers its completions and writes them in batches too) — and a no-op handler.

* throughput: ``queue_tasks`` tasks enqueued in one batch (untimed), then the wall time until
  every worker has drained the queue: time per task (lower is better);
* latency: the workers idle, then ``queue_latency_tasks`` tasks enqueued one at a time, each
  after the previous one started: from just before ``enqueue`` to the handler's first line
  (``perf_counter``, one process), p50 and p99.

The sides alternate order between repetitions; every figure is a ratio within one repetition.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import orjson
import pandas as pd

import msstore
from msstore import TaskQueue

from .common import Comparison, median, order, payload, percentile, progress

NAME = "queue"


async def _msstore_drain(queue: TaskQueue, kind: str, workers: int, batch: int,
                         on_start: Callable[[], None]) -> None:
    async def worker(w: int) -> None:
        while tasks := await queue.claim(f"bench-{w}", types=[kind], limit=batch):
            for _ in tasks:
                on_start()
            await queue.complete_many(f"bench-{w}", [t.task_id for t in tasks])

    await asyncio.gather(*(worker(w) for w in range(workers)))


class _Pgq:
    """``workers`` pgqueuer QueueManagers, one asyncpg connection each."""

    def __init__(self, ms: msstore.Connection, workers: int) -> None:
        self.ms, self.workers = ms, workers
        self.conns: list[asyncpg.Connection] = []

    async def open(self) -> None:
        from pgqueuer import AsyncpgDriver, Queries

        # pgqueuer installs and uses a schema of its own: its connections are the owner's
        self.conns = [await asyncpg.connect(self.ms.migration_url or self.ms.database_url)
                      for _ in range(self.workers + 1)]
        self.queries = Queries(AsyncpgDriver(self.conns[-1]))
        if not await self.queries.schema_is_installed():
            await self.queries.install()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.queries.uninstall()
        for c in self.conns:
            await c.close()

    def managers(self, kind: str, on_start: Callable[[], None]) -> list[Any]:
        from pgqueuer import AsyncpgDriver, Queries, QueueManager

        qms = []
        for conn in self.conns[:-1]:
            qm = QueueManager(Queries(AsyncpgDriver(conn)))

            @qm.entrypoint(kind)
            async def handler(job: Any) -> None:
                on_start()

            qms.append(qm)
        return qms

    async def enqueue(self, kind: str, payloads: list[bytes]) -> None:
        await self.queries.enqueue([kind] * len(payloads), list(payloads), [0] * len(payloads))

    async def drain(self, kind: str, batch: int, on_start: Callable[[], None]) -> None:
        from pgqueuer.types import QueueExecutionMode

        await asyncio.gather(*(qm.run(batch_size=batch, mode=QueueExecutionMode.drain,
                                      dequeue_timeout=timedelta(seconds=1))
                               for qm in self.managers(kind, on_start)))


async def _latency(enqueue: Callable[[int], Awaitable[Any]], started: asyncio.Queue[float],
                   n: int) -> list[float]:
    """Enqueue ``n`` tasks one at a time; seconds from each enqueue to its handler's start."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await enqueue(i)
        out.append(await asyncio.wait_for(started.get(), 30) - t0)
        await asyncio.sleep(0.005)  # the workers are idle again (waiting) before the next
    return out


async def run(ms: msstore.Connection, p: dict[str, int], *, bar: bool = True
              ) -> tuple[list[Comparison], pd.DataFrame]:
    n, workers, batch = p["queue_tasks"], p["queue_workers"], p["queue_batch"]
    n_lat, reps = p["queue_latency_tasks"], p["queue_reps"]
    thr = Comparison(7, NAME, f"claim + complete, {workers} workers: time per task", "µs",
                     "msstore TaskQueue", "pgqueuer", target=("<=", 1.0),
                     target_text="≤ 1× pgqueuer (on par)")
    p50 = Comparison(7, NAME, "enqueue → start p50 (idle workers)", "µs",
                     "msstore TaskQueue", "pgqueuer", target=("<=", 1.0),
                     target_text="≤ 1× pgqueuer (on par)")
    p99 = Comparison(7, NAME, "enqueue → start p99 (idle workers)", "µs",
                     "msstore TaskQueue", "pgqueuer")
    bodies = [payload(i) for i in range(n)]
    encoded = [orjson.dumps(b) for b in bodies]
    samples: list[dict[str, Any]] = []
    pb = progress(reps * 2 * (n + n_lat), "#7 queue", bar)
    pgq = _Pgq(ms, workers)
    await pgq.open()
    kinds: list[str] = []
    try:
        async with TaskQueue(ms) as queue:
            for side in ("msstore", "pgqueuer"):  # warm-up, untimed: statements, caches
                kind = f"bench_{uuid.uuid4().hex[:12]}"
                kinds.append(kind)
                if side == "msstore":
                    await queue.enqueue_many(kind, bodies[:200])
                    await _msstore_drain(queue, kind, workers, batch, lambda: None)
                else:
                    await pgq.enqueue(kind, encoded[:200])
                    await pgq.drain(kind, batch, lambda: None)
            for rep in range(reps):
                row: dict[str, Any] = {"rep": rep}
                for side in order(rep, ["msstore", "pgqueuer"]):
                    kind = f"bench_{uuid.uuid4().hex[:12]}"
                    kinds.append(kind)
                    count = [0]

                    def tick(count: list[int] = count) -> None:
                        count[0] += 1

                    if side == "msstore":
                        await queue.enqueue_many(kind, bodies)
                        t0 = time.perf_counter()
                        await _msstore_drain(queue, kind, workers, batch, tick)
                    else:
                        await pgq.enqueue(kind, encoded)
                        t0 = time.perf_counter()
                        await pgq.drain(kind, batch, tick)
                    wall = time.perf_counter() - t0
                    if count[0] != n:
                        raise RuntimeError(f"{side} ran {count[0]} of {n} tasks")
                    row[f"{side}_tasks_per_s"] = n / wall
                    pb.update(n)
                    lat = await _latency_side(side, ms, queue, pgq, workers, batch, n_lat,
                                              encoded, bodies, kinds)
                    row[f"{side}_p50_us"] = percentile(lat, 50) * 1e6
                    row[f"{side}_p99_us"] = percentile(lat, 99) * 1e6
                    row[f"{side}_latencies_us"] = [v * 1e6 for v in lat]
                    pb.update(n_lat)
                thr.add(1e6 / row["msstore_tasks_per_s"], 1e6 / row["pgqueuer_tasks_per_s"])
                p50.add(row["msstore_p50_us"], row["pgqueuer_p50_us"])
                p99.add(row["msstore_p99_us"], row["pgqueuer_p99_us"])
                samples.append(row)
    finally:
        pb.close()
        await ms.pool.execute("DELETE FROM tasks.queue WHERE task_type = ANY($1::text[])",
                              kinds)
        await pgq.close()
    frame = pd.DataFrame(samples)
    frame.attrs.update(tasks=n, workers=workers, batch=batch)
    thr.detail = (f"{n:,} tasks, batch {batch}: msstore "
                  f"{median(frame['msstore_tasks_per_s']):,.0f}/s, pgqueuer "
                  f"{median(frame['pgqueuer_tasks_per_s']):,.0f}/s")
    p50.detail = f"{n_lat} tasks enqueued one at a time to {workers} idle workers"
    return [thr, p50, p99], frame


async def _latency_side(side: str, ms: msstore.Connection, queue: TaskQueue, pgq: _Pgq,
                        workers: int, batch: int, n: int, encoded: list[bytes],
                        bodies: list[Any], kinds: list[str]) -> list[float]:
    kind = f"bench_{uuid.uuid4().hex[:12]}"
    kinds.append(kind)
    started: asyncio.Queue[float] = asyncio.Queue()

    def tick() -> None:
        started.put_nowait(time.perf_counter())

    if side == "msstore":
        async def worker(w: int) -> None:
            while True:
                for t in await queue.claim(f"lat-{w}", types=[kind], limit=batch, wait=60):
                    tick()
                    await queue.complete(t.task_id, f"lat-{w}")

        running = [asyncio.create_task(worker(w)) for w in range(workers)]
        await asyncio.sleep(0.2)  # every worker is waiting
        try:
            return await _latency(lambda i: queue.enqueue(kind, bodies[i % len(bodies)]),
                                  started, n)
        finally:
            for r in running:
                r.cancel()
            await asyncio.gather(*running, return_exceptions=True)
    qms = pgq.managers(kind, tick)
    runs = [asyncio.create_task(qm.run(batch_size=batch, dequeue_timeout=timedelta(seconds=30)))
            for qm in qms]
    await asyncio.sleep(0.5)  # every manager is listening and waiting
    try:
        return await _latency(lambda i: pgq.queries.enqueue(kind, encoded[i % len(encoded)]),
                              started, n)
    finally:
        for qm in qms:
            qm.shutdown.set()
        await asyncio.gather(*runs, return_exceptions=True)
