"""Notebook 10, Part 2: appenders racing a follower (naive IDENTITY log vs MessageLog), deep pages.

``race`` runs the same workload against either design: ``writers`` connections append to
one channel in transactions held open a random 0..``hold`` seconds after the append (as an
agent does when it logs a message and then writes its state), while one follower pages
"after the last thing I saw" until the writers are done. It counts what the follower missed.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

import msstore
from msstore import MessageLog

#: The naive design: order by the IDENTITY column, page by "seq > cursor".
NAIVE_TABLE = """
CREATE TABLE {table} (seq BIGINT GENERATED ALWAYS AS IDENTITY, message_id UUID NOT NULL,
                      payload JSONB NOT NULL)
"""


async def create_naive(ms: msstore.Connection, table: str) -> None:
    """The naive table, made by the schema owner (the application role has no DDL) and
    granted to the application role, as a migration would."""
    app = await ms.pool.fetchval("SELECT current_user")
    async with ms.owner_connection() as owner:
        await owner.execute(NAIVE_TABLE.format(table=table))
        await owner.execute(f'GRANT SELECT, INSERT ON {table} TO "{app}"')


async def drop_naive(ms: msstore.Connection, table: str) -> None:
    async with ms.owner_connection() as owner:
        await owner.execute(f"DROP TABLE {table}")


NAIVE_APPEND = ("INSERT INTO {table} (message_id, payload) "
                "SELECT * FROM unnest($1::uuid[], $2::jsonb[])")
NAIVE_PAGE = ("SELECT seq, message_id FROM {table} WHERE seq > $1 ORDER BY seq LIMIT $2")
#: The OFFSET page the keyset page is compared with (same rows, same order).
OFFSET_PAGE = """
SELECT message_id, channel, position, agent_id, agent_position, payload, created_at
FROM messages.log WHERE channel = $1 ORDER BY position OFFSET $2 LIMIT $3
"""

Append = Callable[[asyncpg.Connection, list[dict[str, int]]], Awaitable[list[str]]]
Follow = Callable[[int], Awaitable[tuple[list[str], int]]]


def naive(pool: asyncpg.Pool, table: str) -> tuple[Append, Follow]:
    """Append and follow for the IDENTITY table ``table``."""
    async def append(conn: asyncpg.Connection, payloads: list[dict[str, int]]) -> list[str]:
        ids = [uuid.uuid4() for _ in payloads]
        await conn.execute(NAIVE_APPEND.format(table=table), ids, payloads)
        return [str(i) for i in ids]

    async def follow(cursor: int) -> tuple[list[str], int]:
        rows = await pool.fetch(NAIVE_PAGE.format(table=table), cursor, 64)
        return [str(r["message_id"]) for r in rows], (rows[-1]["seq"] if rows else cursor)

    return append, follow


def message_log(log: MessageLog, channel: str) -> tuple[Append, Follow]:
    """Append and follow for ``channel`` of a :class:`MessageLog`."""
    async def append(conn: asyncpg.Connection, payloads: list[dict[str, int]]) -> list[str]:
        return [m.message_id for m in await MessageLog(conn).append_many(channel, payloads)]

    async def follow(cursor: int) -> tuple[list[str], int]:
        page = await log.page(channel, after=cursor, limit=64)
        return [m.message_id for m in page.messages], int(page.next_cursor or cursor)

    return append, follow


async def race(pool: asyncpg.Pool, append: Append, follow: Follow, *, writers: int,
               transactions: int, hold: float = 0.003, seed: int = 0) -> dict[str, Any]:
    """Counts of what the follower saw of ``writers`` × ``transactions`` appends."""
    appended: list[str] = []
    seen: list[str] = []
    done = asyncio.Event()

    async def writer(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        for t in range(transactions):
            payloads = [{"w": w, "t": t, "k": k} for k in range(rng.choice((1, 3)))]
            async with pool.acquire() as conn, conn.transaction():
                ids = await append(conn, payloads)
                await asyncio.sleep(rng.random() * hold)
            appended.extend(ids)

    async def follower() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            ids, cursor = await follow(cursor)
            seen.extend(ids)
            if finished and not ids:
                return
            if not ids:
                await asyncio.sleep(0.001)

    reader = asyncio.create_task(follower())
    t0 = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    seconds = time.perf_counter() - t0
    done.set()
    await reader
    return {"appended": len(appended), "seen": len(seen), "missed": len(set(appended) - set(seen)),
            "repeated": len(seen) - len(set(seen)), "appends_per_s": len(appended) / seconds}


async def deep_page_ms(pool: asyncpg.Pool, log: MessageLog, channel: str, depth: int, *,
                       size: int = 50, repeats: int = 31) -> dict[str, float]:
    """Median ms to read the page of ``size`` messages after the first ``depth``, both ways.

    The two are interleaved, so a busy moment on the machine costs both the same.
    """
    keyset: list[float] = []
    offset: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        page = await log.page(channel, after=depth, limit=size)
        keyset.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rows = await pool.fetch(OFFSET_PAGE, channel, depth, size)
        offset.append(time.perf_counter() - t0)
        assert [m.message_id for m in page.messages] == [str(r["message_id"]) for r in rows]
    return {"keyset_ms": statistics.median(keyset) * 1000,
            "offset_ms": statistics.median(offset) * 1000}


__all__ = ["NAIVE_TABLE", "OFFSET_PAGE", "deep_page_ms", "message_log", "naive", "race"]
