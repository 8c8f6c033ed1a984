"""Notebook 02: the same rows loaded under two sets of indexes, in scratch tables rolled back.

The scratch tables are DDL, which the application role (``ms.pool``) may not run: they are
made on the schema owner's connection (``ms.owner_connection()``), as migrations are.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

import msstore


async def load_with(conn: Any, insert_sql: str, rows: Sequence[tuple[Any, ...]],
                    index_defs: Sequence[str], *, batch: int) -> tuple[float, int]:
    """(insert ms, index bytes) for ``rows`` in a scratch copy of ``agents.state``.

    Everything happens in one transaction that is rolled back, so nothing is left behind and
    the write-ahead log is written as it would be for the real table.
    """
    scratch = f"public.nb02_scratch_{uuid.uuid4().hex[:12]}"
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute(f"CREATE TABLE {scratch} (LIKE agents.state INCLUDING DEFAULTS, "
                           "PRIMARY KEY (agent_id, key))")
        for definition in index_defs:
            await conn.execute(f"CREATE INDEX ON {scratch} {definition}")
        sql = insert_sql.replace("agents.state", scratch)
        t0 = time.perf_counter()
        for i in range(0, len(rows), batch):
            await conn.execute(sql, *map(list, zip(*rows[i:i + batch], strict=True)))
        insert_ms = (time.perf_counter() - t0) * 1000
        size = await conn.fetchval("SELECT pg_indexes_size($1::regclass)", scratch)
    finally:
        await tx.rollback()
    return insert_ms, size


async def compare(ms: msstore.Connection, insert_sql: str, rows: Sequence[tuple[Any, ...]],
                  index_sets: Mapping[str, Sequence[str]], *, rounds: int,
                  batch: int) -> pd.DataFrame:
    """Median insert ms and index MB per set of indexes, the sets alternating each round.

    The last row is the first set divided by the second (how many times the cost). Every
    load runs on one owner connection, so no set pays for a cold one.
    """
    names = list(index_sets)
    got: dict[str, list[tuple[float, int]]] = {name: [] for name in names}
    async with ms.owner_connection() as conn:
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                got[name].append(await load_with(conn, insert_sql, rows, index_sets[name],
                                                 batch=batch))
    cost = pd.DataFrame({name: {"insert ms": statistics.median(t for t, _ in runs),
                                "index MB": runs[-1][1] / 2**20}
                         for name, runs in got.items()}).T
    cost.loc[f"{names[0]} / {names[1]}"] = cost.iloc[0] / cost.iloc[1]
    return cost
