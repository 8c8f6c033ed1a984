"""HybridStateManager pieces that need no server: ids, coalescing, option checks."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import msstore
from msstore._durable import SourceStall
from msstore.hybrid import (
    HybridStateManager,
    StateChange,
    agent_uuid,
    coalesce,
    merge_changes,
    wait_event,
)


def test_agent_ids_must_be_uuids() -> None:
    u = uuid.uuid4()
    assert agent_uuid(u) is u
    assert agent_uuid(str(u)) == u
    for bad in ("agent:42", "", 42, None, b"x"):
        with pytest.raises(msstore.InvalidAgentIdError):
            agent_uuid(bad)


def test_coalesce_keeps_the_highest_revision_per_key() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    changes = [
        StateChange(a, "k", 3, b"3"), StateChange(a, "k", 9, b"9"), StateChange(a, "k", 5, b"5"),
        StateChange(b, "k", 4, None), StateChange(a, "j", 1, b"1"),
    ]
    out = {(c.agent_id, c.key): c for c in coalesce(changes)}
    assert len(out) == 3
    assert out[(a, "k")].revision == 9 and out[(a, "k")].data == b"9"
    assert out[(b, "k")].data is None


async def test_merge_refuses_a_batch_with_a_key_twice() -> None:
    a = uuid.uuid4()
    twice = [StateChange(a, "k", 1, b"1"), StateChange(a, "k", 2, b"2")]
    with pytest.raises(ValueError, match="coalesce"):
        await merge_changes(object(), twice)  # type: ignore[arg-type]  # fails before I/O


@pytest.mark.parametrize("options", [
    {"flusher": "write-through"}, {"flush_threshold": 0}, {"max_backlog": -1},
    {"flush_interval": 0}, {"bucket": "bad.name"},
])
def test_bad_options_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        HybridStateManager(object(), **options)  # type: ignore[arg-type]


async def test_methods_refuse_to_run_before_start() -> None:
    hsm = HybridStateManager(object())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="async with"):
        await hsm.write_state(uuid.uuid4(), "k", 1)


async def test_wait_event_reports_set_or_timed_out() -> None:
    ev = asyncio.Event()
    assert await wait_event(ev, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, ev.set)
    assert await wait_event(ev, 5) is True


async def test_wait_event_keeps_a_cancel_that_arrives_with_the_event() -> None:
    """asyncio.wait_for on 3.11 returns normally here and the cancel is lost (gh-86296)."""
    ev = asyncio.Event()
    task = asyncio.create_task(wait_event(ev, 10))
    await asyncio.sleep(0)  # the task is waiting
    ev.set()
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_log_that_copies_nothing_is_due_for_a_restart_once_per_period() -> None:
    stall = SourceStall(5.0, now=100.0)
    assert stall.due(7, 100.0) is False  # first sight of sequence 7
    assert stall.due(7, 104.9) is False  # not yet 5 s without progress
    assert stall.due(7, 105.0) is True
    assert stall.due(7, 106.0) is False  # at most once per period
    assert stall.due(7, 110.0) is True
    assert stall.due(8, 111.0) is False  # the log moved: the clock starts again
    assert stall.due(8, 115.9) is False
    assert stall.due(8, 116.0) is True


async def test_a_replicated_stream_the_cluster_cannot_place_yet_is_created_again() -> None:
    from nats.js.errors import BadRequestError

    from msstore.kv import NO_PLACEMENT, retry_placement

    calls = []

    async def create() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise BadRequestError(code=400, err_code=NO_PLACEMENT,
                                  description="no suitable peers for placement, peer offline")
        return "created"

    assert await retry_placement(create, "create bucket 'b'", budget=5.0) == "created"
    assert len(calls) == 3

    async def never() -> str:
        raise BadRequestError(code=400, err_code=NO_PLACEMENT, description="peer offline")

    with pytest.raises(msstore.StoreUnavailableError, match=r"peer offline.*every node"):
        await retry_placement(never, "create bucket 'b'", budget=0.2)

    async def other() -> str:  # any other refusal is the caller's to handle, at once
        raise BadRequestError(code=400, err_code=10058, description="name in use")

    with pytest.raises(BadRequestError):
        await retry_placement(other, "create bucket 'b'", budget=5.0)
