"""Listing a bucket's keys once through (``_nats.newest_entries``), against a fake watch.

nats-py's watch may signal "caught up" (None) before the entries that exist were counted; a
listing that believed it would return nothing for keys that exist (a checkpoint snapshot with
no values, a prune that deletes nothing). The stream's subject count decides instead.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import nats.errors
import pytest

from msstore import _nats


@dataclass
class Entry:
    key: str
    delta: int
    value: bytes = b"1"
    operation: str | None = None
    revision: int = 1


class Watcher:
    def __init__(self, items: list[Entry | None]) -> None:
        self.items = list(items)
        self.stopped = False

    async def updates(self, timeout: float = 5.0) -> Entry | None:  # noqa: ASYNC109 (nats-py)
        if not self.items:
            await asyncio.sleep(timeout)
            raise nats.errors.TimeoutError
        return self.items.pop(0)

    async def stop(self) -> None:
        self.stopped = True


class KV:
    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.patterns: list[str] = []

    async def watch(self, pattern: str) -> Watcher:
        self.patterns.append(pattern)
        return self.watcher


class JS:
    def __init__(self, subjects: dict[str, int]) -> None:
        self.subjects = subjects
        self.asked: list[tuple[str, str | None]] = []

    async def stream_info(self, name: str, subjects_filter: str | None = None) -> Any:
        self.asked.append((name, subjects_filter))
        state = type("State", (), {"subjects": self.subjects or None})
        return type("Info", (), {"state": state})


async def test_an_early_caught_up_signal_does_not_end_the_listing_while_keys_exist() -> None:
    watcher = Watcher([None, Entry("a.k1", 1), Entry("a.k2", 0), None])
    kv, js = KV(watcher), JS({"$KV.b.a.k1": 1, "$KV.b.a.k2": 1})
    entries = await _nats.newest_entries(js, kv, "b", "a.>")  # type: ignore[arg-type]
    assert [e.key for e in entries] == ["a.k1", "a.k2"]
    assert js.asked == [("KV_b", "$KV.b.a.>")] and kv.patterns == ["a.>"]
    assert watcher.stopped and watcher.items == [None]  # stopped at the entry with delta 0


async def test_no_matching_subject_answers_empty_without_a_watch() -> None:
    kv, js = KV(Watcher([])), JS({})
    assert await _nats.newest_entries(js, kv, "b", "a.>") == []  # type: ignore[arg-type]
    assert kv.patterns == []


async def test_entries_that_never_come_raise_the_nats_timeout_and_stop_the_watch() -> None:
    watcher = Watcher([None])
    kv, js = KV(watcher), JS({"$KV.b.a.k1": 1})
    with pytest.raises(nats.errors.TimeoutError):
        await _nats.newest_entries(js, kv, "b", "a.>", entry_timeout=0.01)  # type: ignore[arg-type]
    assert watcher.stopped
