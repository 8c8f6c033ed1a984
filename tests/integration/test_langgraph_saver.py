"""MsstoreSaver, LangGraph's checkpointer on msstore, on the real servers (both lanes).

LangGraph's own conformance suite (langgraph-checkpoint-conformance) must report every one of
its 8 capabilities passing; then what the suite does not check: two writers on one thread
(one wins, one CheckpointConflictError), reads before any flush, the rows PostgreSQL holds
after one, the sync methods, and a graph process killed -9 and resumed by a fresh one.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import ALL_CAPABILITIES
from langgraph.checkpoint.conformance.spec import (
    test_copy_thread,
    test_delete_for_runs,
    test_delete_thread,
    test_get_tuple,
    test_list,
    test_prune,
    test_put,
    test_put_writes,
)
from langgraph.checkpoint.conformance.test_utils import (
    generate_checkpoint,
    generate_config,
    generate_metadata,
)

import msstore
from msstore import services
from msstore.integrations.langgraph import MsstoreSaver
from msstore.integrations.langgraph._layout import thread_agent

WORKER = Path(__file__).resolve().parents[1] / "langgraph_worker.py"

#: every test the suite holds, per capability (from its own lists, so a new suite version
#: that adds tests is counted, not silently skipped)
SUITE = {
    "put": test_put.ALL_PUT_TESTS,
    "put_writes": test_put_writes.ALL_PUT_WRITES_TESTS,
    "get_tuple": test_get_tuple.ALL_GET_TUPLE_TESTS,
    "list": test_list.ALL_LIST_TESTS,
    "delete_thread": test_delete_thread.ALL_DELETE_THREAD_TESTS,
    "delete_for_runs": test_delete_for_runs.ALL_DELETE_FOR_RUNS_TESTS,
    "copy_thread": test_copy_thread.ALL_COPY_THREAD_TESTS,
    "prune": test_prune.ALL_PRUNE_TESTS,
}


@pytest.fixture
async def saver(ms: msstore.Connection, unique: Callable[[str], str]
                ) -> AsyncIterator[MsstoreSaver]:
    async with MsstoreSaver(ms, bucket=unique("lg")) as s:
        yield s


async def rows(ms: msstore.Connection, agent: uuid.UUID, prefix: str) -> int:
    n: int = await ms.pool.fetchval(
        "SELECT count(*) FROM agents.state WHERE agent_id = $1 AND starts_with(key, $2)",
        agent, prefix)
    return n


async def put(saver: MsstoreSaver, thread_id: str, parent: str | None = None,
              step: int = 0, **values: Any) -> dict[str, Any]:
    config = generate_config(thread_id, checkpoint_id=parent)
    cp = generate_checkpoint(channel_values=values, channel_versions={k: step + 1
                                                                      for k in values})
    stored: dict[str, Any] = await saver.aput(config, cp, generate_metadata(step=step),
                                              {k: step + 1 for k in values})
    return stored


async def test_the_conformance_suite_reports_all_8_capabilities_passing(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    bucket = unique("lgconf")

    @checkpointer_test(name="MsstoreSaver")
    async def factory() -> AsyncIterator[MsstoreSaver]:
        async with MsstoreSaver(ms, bucket=bucket) as s:
            yield s

    report = await validate(factory)
    report.print_report()
    results = report.results
    assert set(results) == {c.value for c in ALL_CAPABILITIES} == set(SUITE)
    failures = {name: r.failures for name, r in results.items() if r.failures}
    assert failures == {}
    for name, r in results.items():
        assert r.detected and r.passed is True, name
        assert (r.tests_passed, r.tests_failed, r.tests_skipped) == (len(SUITE[name]), 0, 0)
    passed = sum(r.tests_passed for r in results.values())
    assert passed == sum(map(len, SUITE.values())) >= 81
    assert report.conformance_level() == "FULL"
    print(f"conformance: {len(results)}/8 capabilities, {passed} tests passed")


async def test_two_savers_extending_one_thread_yield_one_winner_and_a_conflict(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    bucket, tid = unique("lgcas"), str(uuid.uuid4())
    async with MsstoreSaver(ms, bucket=bucket) as a, MsstoreSaver(ms, bucket=bucket) as b:
        root = await put(a, tid, x="root")
        seen_a, seen_b = await a.aget_tuple(generate_config(tid)), \
            await b.aget_tuple(generate_config(tid))
        assert seen_a and seen_b and seen_a.checkpoint["id"] == seen_b.checkpoint["id"]
        parent = root["configurable"]["checkpoint_id"]
        won = await put(a, tid, parent, step=1, x="a")
        with pytest.raises(msstore.CheckpointConflictError, match="another writer"):
            await put(b, tid, parent, step=1, x="b")
        history = [t.checkpoint["id"] async for t in b.alist(generate_config(tid))]
        assert history == [won["configurable"]["checkpoint_id"], parent]  # no fork
        # the loser re-reads the thread and extends its newest checkpoint
        latest = await b.aget_tuple(generate_config(tid))
        assert latest is not None and latest.checkpoint["channel_values"] == {"x": "a"}
        await put(b, tid, latest.checkpoint["id"], step=2, x="b")

        # racing first writes of a fresh thread: exactly one is stored
        fresh = str(uuid.uuid4())
        got = await asyncio.gather(put(a, fresh, x="a"), put(b, fresh, x="b"),
                                   return_exceptions=True)
        assert sorted(type(g).__name__ for g in got) == ["CheckpointConflictError", "dict"]
        assert len([t async for t in a.alist(generate_config(fresh))]) == 1
        assert isinstance(msstore.CheckpointConflictError("x"), msstore.ConflictError)


async def test_a_checkpoint_is_read_back_the_moment_aput_returned_before_any_flush(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    tid = str(uuid.uuid4())
    async with MsstoreSaver(ms, bucket=unique("lgryw"), flush_interval=3600,
                            flush_threshold=1_000_000, close_timeout=60) as s:
        first = await put(s, tid, x=1)
        second = await put(s, tid, first["configurable"]["checkpoint_id"], step=1, x=2)
        await s.aput_writes(second, [("x", 3)], "task-1")
        agent = thread_agent(s.bucket, tid)
        assert await rows(ms, agent, "") == 0  # PostgreSQL has none of it yet
        latest = await s.aget_tuple(generate_config(tid))
        assert latest is not None
        assert latest.config["configurable"]["checkpoint_id"] == \
            second["configurable"]["checkpoint_id"]
        assert latest.checkpoint["channel_values"] == {"x": 2}
        assert latest.pending_writes == [("task-1", "x", 3)]
        listed = [t async for t in s.alist(generate_config(tid), filter={"step": 0})]
        assert [t.checkpoint["channel_values"] for t in listed] == [{"x": 1}]


async def test_after_flush_postgresql_holds_every_checkpoint_blob_and_write(
        saver: MsstoreSaver, ms: msstore.Connection) -> None:
    tid, parent = str(uuid.uuid4()), None
    for step in range(5):
        stored = await put(saver, tid, parent, step=step, x=step, y=[step] * 3)
        parent = stored["configurable"]["checkpoint_id"]
    await saver.aput_writes(stored, [("x", "w1"), ("y", "w2")], "task-1")
    await saver.flush()
    agent = thread_agent(saver.bucket, tid)
    assert (await rows(ms, agent, "cp."), await rows(ms, agent, "bl."),
            await rows(ms, agent, "wr.")) == (5, 5, 1)  # x (an int) is inline; one call, one key
    steps = await ms.pool.fetch(
        "SELECT (value->'metadata'->>'step')::int AS step FROM agents.state "
        "WHERE agent_id = $1 AND starts_with(key, 'cp.') ORDER BY 1", agent)
    assert [r["step"] for r in steps] == [0, 1, 2, 3, 4]  # metadata is queryable JSONB
    await saver.aprune([tid])
    await saver.flush()
    assert (await rows(ms, agent, "cp."), await rows(ms, agent, "bl."),
            await rows(ms, agent, "wr.")) == (1, 1, 1)
    await saver.adelete_thread(tid)
    await saver.flush()
    assert await rows(ms, agent, "") == 0


async def test_keep_last_bounds_a_thread_to_its_newest_checkpoints_with_their_blobs(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    tid, parent, ids = str(uuid.uuid4()), None, []
    async with MsstoreSaver(ms, bucket=unique("lgkeep"), keep_last=3) as s:
        for step in range(10):  # retention runs after checkpoints 3, 6 and 9
            stored = await put(s, tid, parent, step=step, x=step, y=[step])
            parent = stored["configurable"]["checkpoint_id"]
            ids.append(parent)
            await s.aput_writes(stored, [("x", f"w{step}")], "task-1")
        listed = [t async for t in s.alist(generate_config(tid))]
        assert [t.config["configurable"]["checkpoint_id"] for t in listed] == ids[:-5:-1]
        assert [t.checkpoint["channel_values"] for t in listed] == [
            {"x": n, "y": [n]} for n in (9, 8, 7, 6)]  # every kept checkpoint keeps its blobs
        assert [t.pending_writes for t in listed] == [[("task-1", "x", f"w{n}")]
                                                      for n in (9, 8, 7, 6)]
        await s.flush()
        agent = thread_agent(s.bucket, tid)
        assert (await rows(ms, agent, "cp."), await rows(ms, agent, "bl."),
                await rows(ms, agent, "wr.")) == (4, 4, 4)  # y's blobs (x is inline)


async def test_max_age_lets_old_checkpoints_go_but_keeps_the_newest(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    tid, parent = str(uuid.uuid4()), None
    old = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    async with MsstoreSaver(ms, bucket=unique("lgage"), max_age=3600) as s:
        for step in range(10):  # retention runs after the 10th checkpoint
            cp = generate_checkpoint(channel_values={"x": step},
                                     channel_versions={"x": step + 1})
            if step < 8:
                cp["ts"] = old
            stored = await s.aput(generate_config(tid, checkpoint_id=parent), cp,
                                  generate_metadata(step=step), {"x": step + 1})
            parent = stored["configurable"]["checkpoint_id"]
        listed = [t async for t in s.alist(generate_config(tid))]
        assert [t.checkpoint["channel_values"] for t in listed] == [{"x": 9}, {"x": 8}]
    with pytest.raises(msstore.InvalidOptionError, match="keep_last"):
        MsstoreSaver(ms, keep_last=0)


async def test_sync_methods_work_from_another_thread_and_refuse_on_the_loop(
        saver: MsstoreSaver) -> None:
    tid = str(uuid.uuid4())
    stored = await put(saver, tid, x=1)
    with pytest.raises(msstore.SyncUnsupportedError, match="ainvoke"):
        saver.get_tuple(stored)
    got = await asyncio.to_thread(saver.get_tuple, stored)
    assert got is not None and got.checkpoint["channel_values"] == {"x": 1}
    assert len(await asyncio.to_thread(lambda: list(saver.list(generate_config(tid))))) == 1


def test_without_langgraph_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m.startswith("msstore.integrations.langgraph")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "langgraph.checkpoint.base", None)  # an ImportError
    with pytest.raises(msstore.MissingExtraError, match=r"msstore\[langgraph\]"):
        importlib.import_module("msstore.integrations.langgraph")


async def run_worker(ms: msstore.Connection, database_url: str, bucket: str, thread_id: str,
                     steps: int, *extra: str, kill_after: int | None = None
                     ) -> tuple[list[int], dict[str, Any] | None]:
    """Run tests/langgraph_worker.py; kill -9 it after ``kill_after`` steps if given."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(WORKER), bucket, thread_id, str(steps), *extra,
        env=services.child_env(database_url, ms.nats_url), stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    done: list[int] = []
    final = None
    try:
        async with asyncio.timeout(120):
            while line := (await proc.stdout.readline()).decode():
                kind, _, rest = line.strip().partition(" ")
                if kind == "step":
                    done.append(int(rest))
                    if kill_after is not None and len(done) >= kill_after:
                        proc.send_signal(signal.SIGKILL)
                        break
                elif kind == "final":
                    final = json.loads(rest)
    finally:
        code = await proc.wait()
    assert code == (-signal.SIGKILL if kill_after is not None else 0)
    return done, final


async def test_a_graph_killed_mid_run_is_resumed_by_a_fresh_process_to_the_same_end(
        ms: msstore.Connection, database_url: str, unique: Callable[[str], str]) -> None:
    bucket, steps = unique("lgcrash"), 30
    _, uninterrupted = await run_worker(ms, database_url, bucket, "whole", steps)
    assert uninterrupted is not None and uninterrupted["n"] == steps
    done, _ = await run_worker(ms, database_url, bucket, "killed", steps, kill_after=8)
    assert 8 <= done[-1] < steps  # killed mid-run
    resumed_steps, resumed = await run_worker(ms, database_url, bucket, "killed", steps,
                                              "--resume")
    assert resumed == uninterrupted
    assert resumed_steps and 1 < resumed_steps[0] <= done[-1] + 1  # from the last checkpoint
    async with MsstoreSaver(ms, bucket=bucket) as s:
        latest = await s.aget_tuple(generate_config("killed"))
        assert latest is not None and latest.checkpoint["channel_values"]["n"] == steps
