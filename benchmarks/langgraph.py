"""#10 LangGraph checkpointers: ``MsstoreSaver`` vs ``AsyncPostgresSaver``, same graph, same run.

One deterministic graph (no model calls): a node looping ``steps`` times, each superstep
replacing a ~1 KB state (``memo``) and a counter. A *superstep* here is one run of that node;
LangGraph writes one checkpoint (and the node's pending writes) for each. The graph runs with
LangGraph's default durability (``"async"``: a checkpoint is saved while the next step runs,
and ``ainvoke`` returns only once every save has returned).

Three checkpointers on the same servers, in rotating order per repetition:

* ``InMemorySaver`` — LangGraph's own: the loop's cost with a checkpointer that does no I/O;
* ``MsstoreSaver`` — on the suite's connection, a scratch bucket; a save returns at KV's ack,
  the stream flusher writes ``agents.state`` behind it;
* ``AsyncPostgresSaver`` (``langgraph-checkpoint-postgres``) — on a psycopg
  ``AsyncConnectionPool`` of 16 connections to the same PostgreSQL (as the schema owner, since
  ``setup()`` creates its tables: ``ms.migration_url``), its
  tables in a scratch schema (``search_path``) that is dropped at the end. The saver is used
  the way its documentation shows: one instance, ``setup()`` first. (It serialises its
  statements on one ``asyncio.Lock`` per instance, pool or not: that is the library's design.)

Figures:

* **overhead per superstep**: one thread at a time, ``lg_steps`` supersteps, wall time of
  ``ainvoke`` / ``lg_steps``, minus ``InMemorySaver``'s in the same repetition. MsstoreSaver's
  timing holds no flush (no superstep waits for PostgreSQL); ``flush()`` runs after it,
  untimed here, its time kept in the samples (``msstore_flush_s``);
* **16 concurrent threads**: ``asyncio.gather`` of 16 threads of ``lg_conc_steps`` supersteps
  each on one saver, wall time per superstep (the table; the chart shows steps/s).
  MsstoreSaver's wall time *includes* the final ``await saver.flush()``: the run ends when
  PostgreSQL holds every checkpoint, as the PostgreSQL saver's does;
* **rows in PostgreSQL per 1,000 supersteps**, after that flush: MsstoreSaver's rows in
  ``agents.state`` for its threads; the PostgreSQL saver's rows in ``checkpoints``,
  ``checkpoint_blobs`` and ``checkpoint_writes`` for its threads (every key either saver writes
  is new, so rows held = rows inserted).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypedDict

import pandas as pd
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

import msstore
from msstore.integrations.langgraph import MsstoreSaver
from msstore.integrations.langgraph._layout import thread_agent

from .common import RUN, Comparison, Scratch, median, order, progress, scratch

NAME = "langgraph"
SAVERS = ("memory", "msstore", "postgres")
LABELS = {"memory": "InMemorySaver", "msstore": "MsstoreSaver",
          "postgres": "AsyncPostgresSaver"}
THREADS = 16
PG_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes")


class State(TypedDict):
    n: int
    steps: int
    memo: dict[str, Any]


def memo(n: int) -> dict[str, Any]:
    """The ~1 KB state of superstep ``n`` (about 1,000 bytes as JSON; every field changes)."""
    return {"step": n, "plan": [f"task-{(n * 7 + i) % 97:02d}" for i in range(12)],
            "notes": f"{n:06d}-" + "abcdefghij" * 75,
            "scores": [(n * 31 + i * 17) % 1000 / 1000 for i in range(16)]}


def build() -> StateGraph[State]:
    """One node in a loop; the final state depends only on ``steps``."""

    async def step(state: State) -> dict[str, Any]:
        n = state["n"] + 1
        return {"n": n, "memo": memo(n)}

    def more(state: State) -> str:
        return "step" if state["n"] < state["steps"] else END

    builder = StateGraph(State)
    builder.add_node("step", step)
    builder.add_edge(START, "step")
    builder.add_conditional_edges("step", more)
    return builder


async def run_thread(graph: Any, thread_id: str, steps: int) -> None:
    config = {"configurable": {"thread_id": thread_id}, "recursion_limit": steps + 10}
    final = await graph.ainvoke({"n": 0, "steps": steps, "memo": memo(0)}, config)
    if final["n"] != steps:  # the graph must have run every superstep
        raise AssertionError(f"thread {thread_id} ended at n={final['n']}, wanted {steps}")


@contextlib.asynccontextmanager
async def postgres_saver(ms: msstore.Connection, s: Scratch) -> AsyncIterator[Any]:
    """``AsyncPostgresSaver`` on a 16-connection pool, its tables in a scratch schema."""
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    schema = f"bench_lg_{RUN}_{uuid.uuid4().hex[:6]}"
    async with ms.owner_connection() as conn:  # its own tables: DDL, so the owner's role
        await conn.execute(f'CREATE SCHEMA "{schema}"')

    async def drop() -> None:
        async with ms.owner_connection() as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    s.cleanups.append(drop)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        ms.migration_url or ms.database_url, min_size=THREADS, max_size=THREADS, open=False,
        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row,
                "options": f"-c search_path={schema}"})
    await pool.open(wait=True)
    try:
        saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
        await saver.setup()
        saver.schema = schema  # type: ignore[attr-defined]
        yield saver
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def msstore_saver(ms: msstore.Connection, s: Scratch) -> AsyncIterator[MsstoreSaver]:
    """``MsstoreSaver`` on a scratch bucket; its heads bucket and durability log go too."""
    bucket = s.bucket("lg")
    s.buckets.append(f"{bucket}_heads")

    async def drop_logs() -> None:
        async for info in _streams(ms):
            if info.startswith(f"MSLOG_{bucket}_"):
                await ms.js.delete_stream(info)

    s.cleanups.append(drop_logs)
    async with MsstoreSaver(ms, bucket=bucket) as saver:
        yield saver


async def _streams(ms: msstore.Connection) -> AsyncIterator[str]:
    for info in await ms.js.streams_info_iterator():
        yield info.config.name or ""


async def rows_in_postgres(ms: msstore.Connection, side: str, saver: Any,
                           threads: list[str]) -> int:
    """Rows PostgreSQL holds for these threads (after MsstoreSaver's flush)."""
    if side == "msstore":
        agents = [thread_agent(saver.bucket, t) for t in threads]
        n: int = await ms.pool.fetchval(
            "SELECT count(*) FROM agents.state WHERE agent_id = ANY($1::uuid[])", agents)
        return n
    total = 0
    async with ms.owner_connection() as conn:  # its tables are the owner's, not msstore's
        for table in PG_TABLES:
            total += await conn.fetchval(
                f'SELECT count(*) FROM "{saver.schema}".{table} '
                "WHERE thread_id = ANY($1::text[])", threads)
    return total


async def run(ms: msstore.Connection, p: dict[str, int], *, bar: bool = True
              ) -> tuple[list[Comparison], pd.DataFrame]:
    steps, conc_steps, reps = p["lg_steps"], p["lg_conc_steps"], p["lg_reps"]
    over = Comparison(10, NAME, f"checkpoint overhead per superstep (1 thread, {steps} steps)",
                      "s", "MsstoreSaver", "AsyncPostgresSaver", target=("<=", 0.25),
                      target_text="≤ ¼ of AsyncPostgresSaver's")
    conc = Comparison(10, NAME, f"{THREADS} threads: wall time per superstep (MsstoreSaver "
                      "incl. its flush)", "µs", "MsstoreSaver", "AsyncPostgresSaver",
                      target=("<=", 1 / 3), target_text="≥ 3× AsyncPostgresSaver's steps/s")
    rows = Comparison(10, NAME, "PostgreSQL rows per 1,000 supersteps", "rows",
                      "MsstoreSaver", "AsyncPostgresSaver")
    samples: list[dict[str, Any]] = []
    pb = progress(reps * len(SAVERS) * (steps + THREADS * conc_steps), "#10 langgraph", bar)
    builder = build()
    async with contextlib.AsyncExitStack() as stack:
        s = await stack.enter_async_context(scratch(ms))
        savers: dict[str, BaseCheckpointSaver[Any]] = {
            "memory": InMemorySaver(),
            "msstore": await stack.enter_async_context(msstore_saver(ms, s)),
            "postgres": await stack.enter_async_context(postgres_saver(ms, s)),
        }
        bucket = savers["msstore"].bucket  # type: ignore[attr-defined]
        s.agents += [thread_agent(bucket, f"warm-msstore-{i}") for i in range(THREADS)]
        graphs = {k: builder.compile(checkpointer=v) for k, v in savers.items()}
        for side, graph in graphs.items():  # warm-up, untimed: connections, statements, JIT
            await asyncio.gather(*(run_thread(graph, f"warm-{side}-{i}", 5)
                                   for i in range(THREADS)))
            if side == "msstore":
                await savers["msstore"].flush()  # type: ignore[attr-defined]
        for rep in range(reps):
            row: dict[str, Any] = {"rep": rep}
            threads: dict[str, list[str]] = {k: [] for k in SAVERS}

            def new(side: str, tid: str, threads: dict[str, list[str]] = threads) -> str:
                threads[side].append(tid)
                if side == "msstore":  # its rows are deleted at the end, whatever happens
                    s.agents.append(thread_agent(bucket, tid))
                return tid
            for side in order(rep, list(SAVERS)):  # one thread at a time
                tid = new(side, f"seq-{rep}-{uuid.uuid4().hex[:8]}")
                t0 = time.perf_counter()
                await run_thread(graphs[side], tid, steps)
                row[f"{side}_step_s"] = (time.perf_counter() - t0) / steps
                if side == "msstore":
                    t0 = time.perf_counter()
                    await savers["msstore"].flush()  # type: ignore[attr-defined]
                    row["msstore_flush_s"] = time.perf_counter() - t0
                pb.update(steps)
            for side in order(rep, list(SAVERS)):  # 16 threads at once
                tids = [new(side, f"conc-{rep}-{i}-{uuid.uuid4().hex[:8]}")
                        for i in range(THREADS)]
                row[f"{side}_conc_s"] = await _timed_gather(
                    graphs[side], tids, conc_steps,
                    savers["msstore"].flush if side == "msstore" else None)  # type: ignore[attr-defined]
                pb.update(THREADS * conc_steps)
            done = steps + THREADS * conc_steps  # supersteps of this repetition, per saver
            for side in ("msstore", "postgres"):
                n = await rows_in_postgres(ms, side, savers[side], threads[side])
                row[f"{side}_rows_per_1k"] = n * 1000 / done
                row[f"{side}_overhead_s"] = row[f"{side}_step_s"] - row["memory_step_s"]
            for side in SAVERS:
                row[f"{side}_steps_per_s"] = THREADS * conc_steps / row[f"{side}_conc_s"]
            over.add(row["msstore_overhead_s"], row["postgres_overhead_s"])
            conc.add(row["msstore_conc_s"] / (THREADS * conc_steps) * 1e6,
                     row["postgres_conc_s"] / (THREADS * conc_steps) * 1e6)
            rows.add(row["msstore_rows_per_1k"], row["postgres_rows_per_1k"])
            samples.append(row)
    pb.close()
    frame = pd.DataFrame(samples)
    memory_ms = median(frame["memory_step_s"]) * 1e3
    over.detail = (f"InMemorySaver's loop: {memory_ms:.2f} ms per superstep; MsstoreSaver's "
                   f"flush after {steps} steps: {median(frame['msstore_flush_s']) * 1e3:.0f} ms "
                   "(not in the overhead)")
    conc.detail = (f"steps/s: MsstoreSaver {median(frame['msstore_steps_per_s']):,.0f}, "
                   f"AsyncPostgresSaver {median(frame['postgres_steps_per_s']):,.0f}, "
                   f"InMemorySaver {median(frame['memory_steps_per_s']):,.0f}")
    frame.attrs.update(steps=steps, conc_steps=conc_steps, threads=THREADS)
    return [over, conc, rows], frame


async def _timed_gather(graph: Any, tids: list[str], steps: int,
                        then: Callable[[], Awaitable[None]] | None) -> float:
    """Wall seconds for ``tids`` run at once, plus ``then()`` (MsstoreSaver's flush)."""
    t0 = time.perf_counter()
    await asyncio.gather(*(run_thread(graph, t, steps) for t in tids))
    if then is not None:
        await then()
    return time.perf_counter() - t0
