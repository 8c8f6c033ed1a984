"""msstore.TaskQueue against the real PostgreSQL: processes racing, killed, stale, retried.

Every test works on its own task type (``unique("q")``), so tests never claim each other's
tasks. Worker processes are ``tests/task_worker.py``; they print what they claimed and what
``complete`` acknowledged, which is what the counts below compare with the table.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import msstore
from msstore import LeaseLostError, TaskQueue, TaskStatus, TaskStore
from tests.task_worker import WorkerProcess


@pytest.fixture(scope="module")
async def queue(ms: msstore.Connection) -> AsyncIterator[TaskQueue]:
    async with TaskQueue(ms, recheck_interval=0.5) as q:
        yield q


async def rows(ms: msstore.Connection, task_type: str) -> dict[str, dict[str, Any]]:
    found = await ms.pool.fetch("SELECT * FROM tasks.queue WHERE task_type = $1", task_type)
    return {str(r["task_id"]): dict(r) for r in found}


async def test_four_worker_processes_complete_each_of_2000_tasks_exactly_once(
        ms: msstore.Connection, queue: TaskQueue, unique: Callable[[str], str]) -> None:
    kind = unique("race")
    workers = await asyncio.gather(*(WorkerProcess.start(ms, f"w{i}", kind, "--batch", "10",
                                                         "--idle-exit", "1.5")
                                     for i in range(4)))
    ids = await queue.enqueue_many(kind, [{"n": i} for i in range(2_000)])  # wakes all four
    reports = [await w.wait() for w in workers]

    done = Counter(t for r in reports for t in r.done)
    assert len(done) == 2_000 and set(done) == set(ids)
    assert max(done.values()) == 1  # no task acknowledged twice
    assert all(r.done and not r.lost for r in reports)  # all four raced and won some
    table = await rows(ms, kind)
    assert Counter(r["status"] for r in table.values()) == {"done": 2_000}
    assert {r["attempts"] for r in table.values()} == {1}  # never handed out twice
    for r in reports:  # the table says who completed what, and it matches each report
        assert {t for t, row in table.items() if row["result"] == {"by": r.worker}} \
            == set(r.done)
        assert r.counters is not None and r.counters[0] >= 1  # each got the notification
    assert sum(r.counters[1] for r in reports if r.counters) >= 1  # an idle one was woken by it


async def test_a_worker_killed_mid_lease_has_its_tasks_completed_by_another_after_the_lease(
        ms: msstore.Connection, queue: TaskQueue, unique: Callable[[str], str]) -> None:
    kind = unique("kill")
    ids = await queue.enqueue_many(kind, [{"n": i} for i in range(20)])
    holder = await WorkerProcess.start(ms, "holder", kind, "--hold", "--batch", "5",
                                       "--lease", "3")
    first = await holder.readline()
    assert first.startswith("claimed")
    killed = await holder.kill()
    held = {t for t, _ in killed.claimed}
    assert len(held) == 5 and not killed.done

    # while the dead worker's lease is live nobody else gets its tasks
    others = await queue.claim("test", types=[kind], limit=100, lease=30)
    assert {t.task_id for t in others} == set(ids) - held
    for t in others:
        await queue.complete(t.task_id, "test")
    rescuer = await WorkerProcess.start(ms, "rescuer", kind, "--idle-exit", "6",
                                        "--recheck", "0.3")
    report = await rescuer.wait()

    assert set(report.done) == held and not report.lost
    assert {attempt for _, attempt in report.claimed} == {2}  # the crashed attempt counted
    table = await rows(ms, kind)
    assert Counter(r["status"] for r in table.values()) == {"done": 20}
    assert {t for t, r in table.items() if r["result"] == {"by": "rescuer"}} == held


async def test_claims_come_highest_priority_first_then_oldest(
        queue: TaskQueue, unique: Callable[[str], str]) -> None:
    kind = unique("prio")
    low1 = await queue.enqueue(kind, "low1")
    high = await queue.enqueue(kind, "high", priority=10)
    low2 = await queue.enqueue(kind, "low2")
    mid = await queue.enqueue(kind, "mid", priority=5)
    neg = await queue.enqueue(kind, "neg", priority=-1)
    one_by_one = [(await queue.claim("w", types=[kind]))[0].task_id for _ in range(2)]
    rest = await queue.claim("w", types=[kind], limit=10)
    assert one_by_one == [high, mid]
    assert [t.task_id for t in rest] == [low1, low2, neg]
    assert [t.priority for t in rest] == [0, 0, -1]
    batch = await queue.enqueue_many(kind, [f"b{i}" for i in range(50)], priority=3)
    assert [t.task_id for t in await queue.claim("w", types=[kind], limit=100)] == batch


async def test_a_task_is_not_claimed_before_its_run_after(
        ms: msstore.Connection, queue: TaskQueue, unique: Callable[[str], str]) -> None:
    kind = unique("due")
    later = await queue.enqueue(kind, "later", run_after=1.5)
    now = await queue.enqueue(kind, "now")
    first = await queue.claim("w", types=[kind], limit=10)
    assert [t.task_id for t in first] == [now]
    rechecks = queue.counters["rechecks"]
    second = await queue.claim("w", types=[kind], limit=10, lease=30, wait=20)
    assert [t.task_id for t in second] == [later]
    assert queue.counters["rechecks"] > rechecks  # a due time sends no notification
    row = (await rows(ms, kind))[later]
    claimed_at = row["lease_expires_at"] - timedelta(seconds=30)  # the database's clock
    assert claimed_at >= row["run_after"]


async def test_an_expired_task_is_never_handed_out_and_purge_expired_deletes_it(
        ms: msstore.Connection, queue: TaskQueue, unique: Callable[[str], str]) -> None:
    kind = unique("exp")
    pending = await queue.enqueue(kind, "pending", ttl=0.5)
    leased = await queue.enqueue(kind, "leased", ttl=0.5, priority=1)
    assert [t.task_id for t in await queue.claim("w", types=[kind], lease=0.2)] == [leased]
    await asyncio.sleep(0.7)  # both expired; the lease ran out too
    assert await queue.claim("w", types=[kind], limit=10) == []
    stats = await queue.stats([kind])
    assert int(stats["expired"].sum()) == 2 and int(stats["lease_run_out"].sum()) == 1
    assert await queue.purge_expired() >= 2
    assert await rows(ms, kind) == {}
    assert pending != leased


async def test_a_stale_workers_complete_fail_and_extend_are_refused_and_change_nothing(
        ms: msstore.Connection, queue: TaskQueue, unique: Callable[[str], str]) -> None:
    kind = unique("stale")
    tid = await queue.enqueue(kind, {"job": 1})
    (a,) = await queue.claim("A", types=[kind], lease=0.3)
    await asyncio.sleep(0.4)
    lapsed = (await rows(ms, kind))[tid]
    with pytest.raises(LeaseLostError, match="lease ran out"):
        await queue.complete(tid, "A", {"by": "A"})  # ran out, even with nobody else yet
    assert (await rows(ms, kind))[tid] == lapsed
    (b,) = await queue.claim("B", types=[kind], lease=30)
    assert b.task_id == tid and b.attempt == 2
    before = (await rows(ms, kind))[tid]
    for call in (queue.complete(tid, "A", {"by": "A"}), queue.fail(tid, "A", "boom"),
                 queue.extend(tid, "A", 60)):
        with pytest.raises(LeaseLostError, match="held by 'B'"):
            await call
    assert (await rows(ms, kind))[tid] == before  # every column as it was
    await queue.complete(tid, "B", {"by": "B"})
    with pytest.raises(LeaseLostError, match="it is done"):
        await queue.complete(tid, "B")
    with pytest.raises(LeaseLostError, match="does not exist"):
        await queue.complete(uuid.uuid4(), "B")
    after = (await rows(ms, kind))[tid]
    assert (after["status"], after["result"], after["lease_owner"]) == ("done", {"by": "B"}, None)
    assert a.task_id == tid and issubclass(LeaseLostError, msstore.MsstoreError)


async def test_complete_many_finishes_the_owned_tasks_in_one_call_and_names_the_others(
        ms: msstore.Connection, queue: TaskQueue, unique: Callable[[str], str]) -> None:
    kind = unique("many")
    await queue.enqueue_many(kind, ["a", "b", "c"])
    mine = await queue.claim("A", types=[kind], limit=2)
    (theirs,) = await queue.claim("B", types=[kind])
    before = (await rows(ms, kind))[theirs.task_id]
    with pytest.raises(LeaseLostError, match="held by 'B'") as caught:
        await queue.complete_many("A", [*(t.task_id for t in mine), theirs.task_id],
                                  [{"r": 1}, {"r": 2}, {"r": 3}])
    assert caught.value.task_ids == [theirs.task_id]
    table = await rows(ms, kind)
    assert [table[t.task_id]["result"] for t in mine] == [{"r": 1}, {"r": 2}]
    assert {table[t.task_id]["status"] for t in mine} == {"done"}
    assert table[theirs.task_id] == before


async def test_extend_keeps_a_live_lease_from_being_reclaimed(
        queue: TaskQueue, unique: Callable[[str], str]) -> None:
    kind = unique("extend")
    tid = await queue.enqueue(kind, "long job")
    (t,) = await queue.claim("A", types=[kind], lease=0.4)
    new_expiry = await queue.extend(tid, "A", 30)
    assert new_expiry > t.lease_expires_at
    await asyncio.sleep(0.5)  # past the first lease
    assert await queue.claim("B", types=[kind]) == []
    await queue.complete(tid, "A")


async def test_a_failing_task_is_retried_with_backoff_until_max_attempts_then_dead(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    kind = unique("retry")
    async with TaskQueue(ms, retry_base=10, retry_max=15) as q:
        tid = await q.enqueue(kind, "flaky", max_attempts=3)
        statuses, backoffs, attempts = [], [], []
        for i in range(3):
            (t,) = await q.claim("w", types=[kind])
            attempts.append(t.attempt)
            statuses.append(await q.fail(tid, "w", f"error {i}"))
            row = (await rows(ms, kind))[tid]
            backoffs.append((row["run_after"] - row["updated_at"]).total_seconds())
            assert await q.claim("w", types=[kind]) == []  # not due during its backoff
            await ms.pool.execute("UPDATE tasks.queue SET run_after = now() WHERE task_id = $1",
                                  uuid.UUID(tid))  # the backoff passes at once
        assert attempts == [1, 2, 3]
        assert statuses == [TaskStatus.PENDING, TaskStatus.PENDING, TaskStatus.DEAD]
        assert backoffs[:2] == [10.0, 15.0]  # 10 * 2**(attempt-1), capped at retry_max
        assert await q.claim("w", types=[kind]) == []  # dead is never claimed
        row = (await rows(ms, kind))[tid]
        assert (row["status"], row["attempts"], row["last_error"]) == ("dead", 3, "error 2")
        tid2 = await q.enqueue(kind, "retry now", max_attempts=2)
        await q.claim("w", types=[kind])
        assert await q.fail(tid2, "w", "oops", retry_in=0) is TaskStatus.PENDING
        assert [t.attempt for t in await q.claim("w", types=[kind])] == [2]
        stats = await q.stats([kind])
        assert stats.set_index("status")["tasks"].to_dict() == {"dead": 1, "running": 1}


async def test_a_lease_that_runs_out_on_the_last_attempt_buries_the_task_as_dead(
        ms: msstore.Connection, queue: TaskQueue, unique: Callable[[str], str]) -> None:
    kind = unique("bury")
    tid = await queue.enqueue(kind, "crashes every time", max_attempts=1)
    await queue.claim("crasher", types=[kind], lease=0.2)
    await asyncio.sleep(0.3)
    buried = queue.counters["buried"]
    assert await queue.claim("w", types=[kind], wait=0.1) == []
    row = (await rows(ms, kind))[tid]
    assert (row["status"], row["attempts"], row["lease_owner"]) == ("dead", 1, None)
    assert "lease" in row["last_error"] and queue.counters["buried"] == buried + 1


async def test_an_idle_worker_is_woken_by_the_enqueue_notification_not_a_recheck(
        ms: msstore.Connection, queue: TaskQueue, unique: Callable[[str], str]) -> None:
    kind = unique("wake")
    async with TaskQueue(ms, recheck_interval=60) as idle:
        waiting = asyncio.create_task(idle.claim("idle", types=[kind], wait=120))
        for _ in range(6_000):  # until its first (empty) claim ran: then it waits
            if idle.counters["claims"]:
                break
            await asyncio.sleep(0.01)
        tid = await queue.enqueue(kind, "wake up")
        got = await asyncio.wait_for(waiting, 120)
    assert [t.task_id for t in got] == [tid]
    assert idle.counters["wakeups"] == 1 and idle.counters["rechecks"] == 0
    assert idle.counters["notifications"] >= 1


async def test_taskstore_reads_the_queues_tasks_from_the_same_table(
        ms: msstore.Connection, queue: TaskQueue, unique: Callable[[str], str]) -> None:
    kind = unique("view")
    tid = await queue.enqueue(kind, {"a": 1})
    store = TaskStore(ms.pool)
    assert await store.retrieve(tid) == {"a": 1}
    assert tid in [h.key for h in await store.search({"a": 1}, limit=1000)]


async def test_bad_input_is_refused_with_a_typed_error_before_any_write(
        ms: msstore.Connection, queue: TaskQueue, unique: Callable[[str], str]) -> None:
    kind = unique("bad")
    with pytest.raises(msstore.InvalidValueError, match="task_type"):
        await queue.enqueue("", {})
    with pytest.raises(msstore.NotSerializableError):
        await queue.enqueue(kind, {1, 2})
    with pytest.raises(msstore.InvalidValueError, match="either expires_at or ttl"):
        await queue.enqueue(kind, {}, ttl=1, expires_at=datetime.now(UTC))
    with pytest.raises(msstore.InvalidOptionError, match="lease"):
        await queue.claim("w", types=[kind], lease=0)
    with pytest.raises(msstore.InvalidKeyError):
        await queue.complete("not-a-uuid", "w")
    assert await rows(ms, kind) == {}
    closed = TaskQueue(ms)
    with pytest.raises(msstore.NotOpenError):
        await closed.enqueue(kind, {})
