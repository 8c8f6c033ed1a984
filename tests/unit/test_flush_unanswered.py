"""flush() rides out a JetStream that is connected but does not answer for a while (a stream
or consumer without a leader after a node was killed), and still fails at once on an outage."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import nats.errors
import pytest

from msstore.flushers import Flusher, FlushSettings
from msstore.merge import StateChange

SETTINGS = FlushSettings(bucket="b", flush_threshold=10, flush_interval=1.0, ttl=60.0,
                         batch_size=10, durable="d", ack_wait=30.0, base_backoff=0.01,
                         max_backoff=0.1, backlog_refresh=1.0, fetch_timeout=1.0,
                         poll_interval=0.01)


class Silent(Flusher):
    """A flusher whose JetStream calls time out ``silent`` times, then answer."""

    name = "silent"

    def __init__(self, silent: int, connected: bool) -> None:
        super().__init__(SETTINGS, SimpleNamespace(), SimpleNamespace(),  # type: ignore[arg-type]
                         SimpleNamespace(is_connected=connected))  # type: ignore[arg-type]
        self.silent, self.calls = silent, 0

    async def _answer(self) -> Any:
        self.calls += 1
        if self.calls <= self.silent:
            raise nats.errors.TimeoutError
        return True

    async def _target(self) -> object:
        return await self._answer()

    async def _done(self, target: object) -> bool:
        return bool(await self._answer())

    async def _drain(self) -> None:  # never runs: the worker is not started
        raise AssertionError

    def note_write(self, change: StateChange) -> None:
        pass

    def backlog(self) -> int:
        return 0

    async def pending(self, agent: uuid.UUID, key: str, subject: str) -> StateChange | None:
        return None


async def test_timeouts_while_connected_are_retried_until_jetstream_answers() -> None:
    f = Silent(silent=3, connected=True)
    await f.flush()
    assert f.calls == 5  # three unanswered, then the mark and the check


async def test_a_timeout_while_disconnected_is_the_outage_it_is() -> None:
    f = Silent(silent=1, connected=False)
    with pytest.raises(nats.errors.TimeoutError):
        await f.flush()
    assert f.calls == 1
