"""Notebook 10's plumbing: worker processes, a sampler of the queue over time, a naive queue.

(Not `queue.py`: a script run from this folder would shadow the standard library's `queue`.)

The worker processes are ``tests/task_worker.py`` (outside the package, shared with the
integration tests): each prints what it claimed and what ``complete`` acknowledged, so the
notebook counts the same things the tests do. The *naive* queue is the seed's table used as
it is — read the oldest pending rows, then mark them running — which is what a queue without
``FOR UPDATE SKIP LOCKED`` does.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pandas as pd

import msstore

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests/
from tests.task_worker import Report, WorkerProcess

__all__ = ["Report", "WorkerProcess", "naive_race", "sampling"]


@asynccontextmanager
async def sampling(queue: msstore.TaskQueue, kind: str,
                   every: float = 0.05) -> AsyncIterator[list[dict[str, Any]]]:
    """Sample ``queue.stats([kind])`` every ``every`` seconds: one row per sample and status."""
    samples: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    async def sample() -> None:
        while True:
            stats = await queue.stats([kind])
            at = time.perf_counter() - t0
            counts = stats.set_index("status")["tasks"].to_dict()
            samples.append({"s": at, **{s.value: counts.get(s.value, 0)
                                        for s in msstore.TaskStatus}})
            await asyncio.sleep(every)

    task = asyncio.create_task(sample())
    try:
        yield samples
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def naive_race(ms: msstore.Connection, kind: str, workers: int,
                     batch: int) -> pd.DataFrame:
    """``workers`` coroutines take batches the naive way; one row per (worker, task) handed out.

    Each reads the oldest pending rows, then marks them running in a second statement: two
    workers that read before either one's update take the same rows.
    """
    handed: list[dict[str, Any]] = []
    one_writer = asyncio.Lock()  # the marks run one at a time (overlapping ones deadlock)

    async def worker(w: int) -> None:
        while True:
            async with ms.pool.acquire() as conn:
                ids = [r["task_id"] for r in await conn.fetch(
                    "SELECT task_id FROM tasks.queue WHERE task_type = $1 "
                    "AND status = 'pending' ORDER BY created_at LIMIT $2", kind, batch)]
                if not ids:
                    return
                await asyncio.sleep(0)  # the other workers run between the two statements
                async with one_writer:
                    await conn.execute("UPDATE tasks.queue SET status = 'done' "
                                       "WHERE task_id = ANY($1::uuid[])", ids)
            handed.extend({"worker": f"naive-{w}", "task_id": str(t)} for t in ids)

    await asyncio.gather(*(worker(w) for w in range(workers)))
    return pd.DataFrame(handed, columns=["worker", "task_id"])
