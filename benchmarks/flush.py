"""#1 Flushing N dirty keys: each msstore flusher vs the seed's ``flushAgent`` and the raw floor.

* seed (literal ``flushAgent``, seed 4.2): in one transaction, for every dirty key one KV
  ``get`` and one ``INSERT … ON CONFLICT`` ``execute`` — 2·N round trips;
* raw floor: rows already serialised, binary ``COPY`` (asyncpg ``copy_records_to_table``)
  into a temp table plus one guarded merge statement — what PostgreSQL needs at least;
* msstore ``dirty-set`` / ``stream``: ``HybridStateManager.flush()`` after N acknowledged
  ``write_state`` calls. The stream flusher's tail has taken in and parsed the N log messages
  as the log copied them (untimed, like the dirty-set's dict and the floor's serialised rows);
  its flush merges them and acks the N messages.

Each repetition writes a fresh agent's N keys for every variant (untimed), then times the four
flushes back to back in a rotating order, each starting from a merged GIN pending list.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import asyncpg
import pandas as pd

import msstore
from msstore.codec import dumps
from msstore.hybrid import FlusherName, HybridStateManager
from msstore.keys import join_key

from .common import Comparison, gather_chunked, order, payload, progress, scratch, timed

SEED_UPSERT = """
INSERT INTO agents.state (agent_id, key, value, version)
VALUES ($1, $2, $3::text::jsonb, $4)
ON CONFLICT (agent_id, key) DO UPDATE SET value = excluded.value, version = excluded.version
"""

FLOOR_TEMP = """
CREATE TEMP TABLE bench_floor (agent_id uuid, key text, value text, version bigint)
ON COMMIT DROP
"""
FLOOR_MERGE = """
INSERT INTO agents.state (agent_id, key, value, version, updated_at)
SELECT agent_id, key, value::jsonb, version, now() FROM bench_floor
ON CONFLICT (agent_id, key) DO UPDATE
    SET value = excluded.value, version = excluded.version, updated_at = excluded.updated_at
    WHERE agents.state.version < excluded.version
"""

#: Nothing is committed before the timed flush(): no threshold, no interval, and a batch (the
#: most the stream flusher's tail holds before it commits) larger than any measured flush.
QUIET: dict[str, Any] = {"flush_threshold": 10**9, "flush_interval": 3600.0,
                         "batch_size": 20_000, "max_backlog": 10**7}


async def seed_flush_agent(ms: msstore.Connection, kv: Any, agent: uuid.UUID,
                           dirty_keys: list[str]) -> int:
    """The seed's ``flushAgent``, literally: one get and one execute per key, one transaction.

    Returns the number of SQL statements it issued (one per key that exists in KV).
    """
    statements = 0
    async with ms.pool.acquire() as conn, conn.transaction():
        for key in dirty_keys:
            entry = await kv.get(join_key(str(agent), key))
            if entry.value is not None:
                await conn.execute(SEED_UPSERT, agent, key, entry.value.decode(), entry.revision)
                statements += 1
    return statements


async def merge_gin_pending_list(ms: msstore.Connection) -> None:
    """Merge the GIN index's pending list (untimed, before each timed flush).

    With ``fastupdate`` (the default) a GIN index collects new entries in a pending list and
    the statement that pushes it past ``gin_pending_list_limit`` (4 MB) merges it, for tens of
    milliseconds — so one variant would pay for the rows another inserted. Starting each from
    an empty list makes every timed flush pay for its own rows only.
    """
    with contextlib.suppress(asyncpg.PostgresError):  # needs ownership of the index
        async with ms.owner_connection() as owner:
            await owner.fetchval("SELECT gin_clean_pending_list('agents.idx_state_value_gin')")


async def raw_floor(ms: msstore.Connection, records: list[tuple[Any, ...]]) -> int:
    """Binary COPY of pre-serialised rows into a temp table, then one merge; 3 statements."""
    # a temporary table is DDL: the application role (the pool's) may not make one
    async with ms.owner_connection() as conn, conn.transaction():
        await conn.execute(FLOOR_TEMP)
        await conn.copy_records_to_table("bench_floor", records=records,
                                         columns=["agent_id", "key", "value", "version"])
        await conn.execute(FLOOR_MERGE)
    return 3


async def run(ms: msstore.Connection, p: dict[str, int], *, bar: bool = True
              ) -> tuple[list[Comparison], pd.DataFrame]:
    n, reps = p["flush_keys"], p["flush_reps"]
    keys = [f"k{i:05d}" for i in range(n)]
    values = [payload(i) for i in range(n)]
    encoded = [dumps(v) for v in values]
    samples: list[dict[str, Any]] = []
    cmp_seed = {f: Comparison(1, "flush", f"flush {n:,} dirty keys", "s", f"{f} flusher",
                              "seed flushAgent") for f in ("dirty-set", "stream")}
    cmp_floor = {f: Comparison(1, "flush", f"flush {n:,} dirty keys", "s", f"{f} flusher",
                               "raw floor (COPY + merge)") for f in ("dirty-set", "stream")}
    cmp_seed["dirty-set"].target, cmp_seed["dirty-set"].target_text = ("<=", 1 / 50), "≥ 50× faster"
    cmp_seed["stream"].target, cmp_seed["stream"].target_text = ("<=", 1 / 10), "≥ 10× faster"
    cmp_floor["dirty-set"].target, cmp_floor["dirty-set"].target_text = ("<=", 1.5), "≤ 1.5× floor"
    statements: dict[str, list[int]] = {"seed": [], "floor": [], "dirty-set": [], "stream": []}
    early: dict[str, list[int]] = {"dirty-set": [], "stream": []}
    pb = progress(reps * 4, "#1 flush", bar)
    async with scratch(ms) as s:
        seed_kv = await s.kv("seed")
        managers: dict[str, HybridStateManager] = {}
        flushers: tuple[FlusherName, ...] = ("dirty-set", "stream")
        for f in flushers:
            hsm = HybridStateManager(ms, bucket=s.bucket(f), flusher=f,
                                     durable=f"bench-{uuid.uuid4().hex[:8]}", **QUIET)
            await hsm.start()
            s.cleanups.append(hsm.close)
            managers[f] = hsm
        for rep in range(reps):
            agents = {v: s.agent() for v in ("seed", "floor", "dirty-set", "stream")}
            # untimed setup: the same N values reach KV for each variant
            a = agents["seed"]
            await gather_chunked(
                (lambda k=k, d=d, a=a: seed_kv.put(join_key(str(a), k), d))  # type: ignore[misc]
                for k, d in zip(keys, encoded, strict=True))
            for name, hsm in managers.items():
                b = agents[name]
                await gather_chunked(
                    (lambda k=k, v=v, h=hsm, b=b: h.write_state(b, k, v))  # type: ignore[misc]
                    for k, v in zip(keys, values, strict=True))
            fa = agents["floor"]
            records = [(fa, k, d.decode(), i + 1) for i, (k, d) in enumerate(
                zip(keys, encoded, strict=True))]
            times: dict[str, float] = {}
            for variant in order(rep, ["seed", "floor", "dirty-set", "stream"]):
                await merge_gin_pending_list(ms)  # untimed: no variant pays for another's rows
                if variant == "seed":
                    t0 = time.perf_counter()
                    issued = await seed_flush_agent(ms, seed_kv, agents["seed"], keys)
                    times[variant] = time.perf_counter() - t0
                    statements["seed"].append(issued)
                elif variant == "floor":
                    times[variant] = await timed(raw_floor(ms, records))
                    statements["floor"].append(3)
                else:
                    hsm = managers[variant]
                    before = hsm.counters
                    times[variant] = await timed(hsm.flush())
                    after = hsm.counters
                    statements[variant].append(after["sql_statements"] - before["sql_statements"])
                    # the timed flush must have done all the work: nothing flushed in advance
                    early[variant].append(n - (after["rows_flushed"] - before["rows_flushed"]))
                    # let a trailing drain finish before the next setup writes
                    await asyncio.sleep(hsm.settings.fetch_timeout + 0.1)
                pb.update()
            for f in ("dirty-set", "stream"):
                cmp_seed[f].add(times[f], times["seed"])
                cmp_floor[f].add(times[f], times["floor"])
            samples.append({"rep": rep, **{f"{k}_s": v for k, v in times.items()},
                            **{f"{k}_flushed_early": v[-1] for k, v in early.items()},
                            **{f"{k}_statements": v[-1] for k, v in statements.items()}})
        rows = await ms.pool.fetchval(
            "SELECT count(*) FROM agents.state WHERE agent_id = ANY($1::uuid[])", s.agents)
    pb.close()
    for f in ("dirty-set", "stream"):
        stm = statements[f]
        cmp_seed[f].detail = (f"SQL statements per flush: seed {max(statements['seed'])}, "
                              f"{f} {max(stm)}, floor 3")
        cmp_floor[f].detail = cmp_seed[f].detail
    frame = pd.DataFrame(samples)
    frame.attrs["rows_in_sql"] = int(rows or 0)
    frame.attrs["expected_rows"] = 4 * n * reps
    frame.attrs["keys"] = n
    return [cmp_seed["dirty-set"], cmp_floor["dirty-set"], cmp_seed["stream"],
            cmp_floor["stream"]], frame
