"""The lifecycle transition table, checked pair by pair (no servers)."""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from collections import deque
from types import SimpleNamespace
from typing import Any

import pytest

from msstore._nats import BucketEpoch
from msstore.errors import InvalidKeyError, InvalidOptionError, MsstoreError, NotOpenError
from msstore.lifecycle import (
    TRANSITIONS,
    IllegalTransitionError,
    LifecycleState,
    StateLifecycleManager,
    StateTracker,
    check_transition,
)

S = LifecycleState

#: The seed's transitions, written out independently of the module's table.
LEGAL = {
    (S.COLD, S.HYDRATING),
    (S.HYDRATING, S.ACTIVE),
    (S.HYDRATING, S.COLD),
    (S.ACTIVE, S.FLUSHING),
    (S.FLUSHING, S.ACTIVE),
    (S.ACTIVE, S.EXPIRED),
    (S.EXPIRED, S.HYDRATING),
}
ALL_PAIRS = list(itertools.product(S, S))


def path_to(target: LifecycleState) -> list[LifecycleState]:
    """The shortest legal walk from COLD to ``target`` (breadth first over LEGAL)."""
    seen = {S.COLD: [S.COLD]}
    queue = deque([S.COLD])
    while queue:
        state = queue.popleft()
        for a, b in sorted(LEGAL, key=lambda p: (p[0].value, p[1].value)):
            if a is state and b not in seen:
                seen[b] = [*seen[a], b]
                queue.append(b)
    return seen[target]


def tracker_in(state: LifecycleState) -> tuple[StateTracker, uuid.UUID]:
    tracker, agent = StateTracker(), uuid.uuid4()
    for step in path_to(state)[1:]:
        tracker.transition(agent, step)
    assert tracker.state(agent) is state
    return tracker, agent


def test_there_are_25_pairs_and_the_table_holds_exactly_the_seven_legal_ones() -> None:
    assert len(ALL_PAIRS) == 25
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table == LEGAL
    assert set(TRANSITIONS) == set(S)


@pytest.mark.parametrize(("from_state", "to_state"), ALL_PAIRS,
                         ids=[f"{a.name}->{b.name}" for a, b in ALL_PAIRS])
def test_every_pair_is_accepted_or_refused(from_state: LifecycleState,
                                           to_state: LifecycleState) -> None:
    tracker, agent = tracker_in(from_state)
    events: list[tuple[Any, ...]] = []
    tracker.on_transition(lambda *args: events.append(args))
    if (from_state, to_state) in LEGAL:
        check_transition(from_state, to_state)
        event = tracker.transition(agent, to_state)
        assert tracker.state(agent) is to_state
        assert (event.from_state, event.to_state) == (from_state, to_state)
        assert events == [(agent, from_state, to_state, event.at)]
    else:
        with pytest.raises(IllegalTransitionError) as info:
            check_transition(from_state, to_state, agent)
        with pytest.raises(IllegalTransitionError):
            tracker.transition(agent, to_state)
        assert tracker.state(agent) is from_state  # refused: nothing changed
        assert events == []
        err = info.value
        assert isinstance(err, MsstoreError)
        assert (err.from_state, err.to_state, err.agent_id) == (from_state, to_state, agent)
        message = str(err)
        assert str(agent) in message and from_state.name in message and to_state.name in message
        for legal in TRANSITIONS[from_state]:
            assert legal.name in message


def test_unknown_agent_is_cold_and_history_records_in_order() -> None:
    tracker, agent = StateTracker(), uuid.uuid4()
    assert tracker.state(agent) is S.COLD
    for step in (S.HYDRATING, S.ACTIVE, S.FLUSHING, S.ACTIVE, S.EXPIRED, S.HYDRATING, S.COLD):
        tracker.transition(agent, step)
    pairs = [(e.from_state, e.to_state) for e in tracker.history]
    assert set(pairs) == LEGAL  # this walk takes every legal edge
    assert [e.at for e in tracker.history] == sorted(e.at for e in tracker.history)


def test_a_broken_listener_does_not_break_transitions_and_unsubscribe_works() -> None:
    tracker, agent = StateTracker(), uuid.uuid4()
    seen: list[LifecycleState] = []

    def broken(*_args: object) -> None:
        raise RuntimeError("listener bug")

    tracker.on_transition(broken)
    stop = tracker.on_transition(lambda _a, _f, to, _t: seen.append(to))
    tracker.transition(agent, S.HYDRATING)
    stop()
    tracker.transition(agent, S.ACTIVE)
    assert seen == [S.HYDRATING]
    assert tracker.state(agent) is S.ACTIVE


@pytest.mark.parametrize("options", [
    {"ttl": 10.0, "idle_timeout": 10.0},
    {"ttl": 10.0, "idle_timeout": 20.0},
    {"ttl": 0.0},
    {"hydrate_chunk": 0},
    {"hydrate_chunk": True},
    {"ttl": "60"},
    {"idle_timeout": -1.0},
    {"sql_timeout": 0},
    {"nats_timeout": float("inf")},
    {"sweep_interval": 0},
    {"flush_on_close": "yes"},
    {"clock": 3.0},
])
def test_bad_options_are_refused_before_any_io(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidOptionError) as info:
        StateLifecycleManager(None, **options)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert any(name in str(info.value) for name in options)


def test_a_bad_bucket_name_is_an_invalid_key() -> None:
    with pytest.raises(InvalidKeyError):
        StateLifecycleManager(None, bucket="bad.name")  # type: ignore[arg-type]


async def test_use_before_start_and_after_close_raises_not_open() -> None:
    lm = StateLifecycleManager(None)  # type: ignore[arg-type]
    agent = uuid.uuid4()
    with pytest.raises(NotOpenError, match="not started"):
        await lm.write_state(agent, "k", 1)
    with pytest.raises(NotOpenError, match="not started"):
        await lm.read_state(agent, "k")
    await lm.close()  # closing a manager never started releases nothing
    with pytest.raises(NotOpenError, match="closed"):
        await lm.flush_agent(agent)
    with pytest.raises(NotOpenError, match="started once"):
        await lm.start()
    assert isinstance(NotOpenError("x"), RuntimeError)


def test_listeners_must_be_callable() -> None:
    lm = StateLifecycleManager(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match="listener"):
        lm.on_transition("print")  # type: ignore[arg-type]


class FakeStreams:
    """``stream_info`` of one stream that can be recreated (a new creation time, seq 0)."""

    def __init__(self) -> None:
        self.created = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
        self.last_seq = 0
        self.calls = 0

    async def stream_info(self, name: str) -> Any:
        self.calls += 1
        return SimpleNamespace(created=self.created,
                               state=SimpleNamespace(last_seq=self.last_seq))

    def recreate(self) -> None:
        self.created += dt.timedelta(seconds=1)
        self.last_seq = 0


async def test_bucket_epoch_reads_again_only_when_a_revision_goes_back() -> None:
    js = FakeStreams()
    js.last_seq = 10
    epoch = BucketEpoch(js, "b")  # type: ignore[arg-type]
    first = await epoch.read()
    assert first == int(js.created.timestamp() * 1_000_000) and epoch.high == 10
    assert not await epoch.saw([11, 12]) and not await epoch.saw([])
    assert (epoch.high, js.calls) == (12, 1)  # growing revisions: nothing to read
    assert not await epoch.saw([5])           # lower, but the same incarnation (out of order)
    assert (epoch.epoch, js.calls) == (first, 2)
    js.recreate()
    js.last_seq = 1
    assert await epoch.saw([1])               # back to 1: a new incarnation
    assert epoch.epoch == first + 1_000_000 and epoch.high == 1
    assert not await epoch.saw([2]) and js.calls == 3
