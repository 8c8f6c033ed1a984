"""#9 The message log: a deep keyset page against OFFSET, and what ordered appends cost.

One channel of ``msglog_messages`` messages (~250-byte payloads), vacuumed and analysed:

* **last page**: the 50 messages after the first ``msglog_messages - 50``, read with
  ``MessageLog.page(after=…)`` (keyset: an index range from the cursor) and with the same
  query written ``ORDER BY position OFFSET n LIMIT 50`` (the index walked from the start);
* **append**: 8 connections appending single messages to one channel, with
  ``MessageLog.append`` (the channel's head row is bumped, so appends to a channel commit one
  at a time: the price of an order a follower can trust) and with a plain insert into an
  IDENTITY-ordered scratch table with the seed log's columns and indexes plus the age index
  (the naive design, whose followers can skip messages; notebook 10, Part 2, shows that).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any

import pandas as pd

import msstore
from msstore import MessageLog

from .common import RUN, Comparison, order, payload, progress

PAGE = 50
WRITERS = 8
_OFFSET_PAGE = """
SELECT message_id, channel, position, agent_id, agent_position, payload, created_at
FROM messages.log WHERE channel = $1 ORDER BY position OFFSET $2 LIMIT $3
"""
_NAIVE_TABLE = """
CREATE TABLE {t} (message_id UUID PRIMARY KEY, seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
                  agent_id UUID, channel TEXT NOT NULL, payload JSONB NOT NULL,
                  created_at TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE INDEX ON {t} (channel, seq);
CREATE INDEX ON {t} (channel, created_at);
CREATE INDEX ON {t} USING gin (payload)
"""
_NAIVE_APPEND = "INSERT INTO {t} (message_id, channel, payload) VALUES ($1, $2, $3)"


async def _median_us(calls: int, fn: Any) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


async def _appends_us(ms: msstore.Connection, per_writer: int, append: Any) -> float:
    """Median µs per append with WRITERS connections appending at once."""
    times: list[float] = []

    async def writer(w: int) -> None:
        for i in range(per_writer):
            t0 = time.perf_counter()
            await append(w, i)
            times.append(time.perf_counter() - t0)

    await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    return statistics.median(times) * 1e6


async def run(ms: msstore.Connection, p: dict[str, int], *, bar: bool = True
              ) -> tuple[list[Comparison], pd.DataFrame]:
    n, reps, calls = p["msglog_messages"], p["msglog_reps"], p["msglog_calls"]
    log = MessageLog(ms)
    tag = f"{RUN}_{uuid.uuid4().hex[:6]}"
    deep, busy, naive = f"bench_msglog_{tag}", f"bench_msglog_busy_{tag}", f"bench_naive_{tag}"
    page = Comparison(9, "message log", f"last page of {n:,} messages", "µs",
                      "keyset (after=)", "OFFSET", detail=f"{PAGE} messages per page")
    append = Comparison(9, "message log", f"append, {WRITERS} writers on one channel", "µs",
                        "MessageLog.append", "IDENTITY insert",
                        detail="the price of per-channel order (appends commit one at a time)")
    samples: list[dict[str, Any]] = []
    pb = progress(reps, "#9 message log", bar)
    try:
        for start in range(0, n, 5_000):
            await log.append_many(deep, [payload(i) for i in range(start, min(n, start + 5_000))])
        app = await ms.pool.fetchval("SELECT current_user")
        async with ms.owner_connection() as owner:  # maintenance and DDL: the owner's
            await owner.execute("VACUUM (ANALYZE) messages.log")
            await owner.execute(_NAIVE_TABLE.format(t=naive))
            await owner.execute(f'GRANT SELECT, INSERT ON {naive} TO "{app}"')
        reads = {"keyset": lambda: log.page(deep, after=n - PAGE, limit=PAGE),
                 "offset": lambda: ms.pool.fetch(_OFFSET_PAGE, deep, n - PAGE, PAGE)}
        appends = {
            "MessageLog": lambda w, i: log.append(busy, payload(i)),
            "IDENTITY": lambda w, i: ms.pool.execute(_NAIVE_APPEND.format(t=naive),
                                                     uuid.uuid4(), busy, payload(i)),
        }
        for rep in range(reps):
            got: dict[str, float] = {}
            for name in order(rep, list(reads)):
                got[name] = await _median_us(calls, reads[name])
            for name in order(rep, list(appends)):
                got[name] = await _appends_us(ms, max(1, calls // 2), appends[name])
            page.add(got["keyset"], got["offset"])
            append.add(got["MessageLog"], got["IDENTITY"])
            samples.append({"rep": rep, **{f"{k}_us": v for k, v in got.items()}})
            pb.update()
    finally:
        pb.close()
        await ms.pool.execute("DELETE FROM messages.log WHERE channel = ANY($1)", [deep, busy])
        await ms.pool.execute("DELETE FROM messages.channel_heads WHERE channel = ANY($1)",
                              [deep, busy])
        async with ms.owner_connection() as owner:
            await owner.execute(f"DROP TABLE IF EXISTS {naive}")
    frame = pd.DataFrame(samples)
    frame.attrs["messages"] = n
    return [page, append], frame


__all__ = ["run"]
