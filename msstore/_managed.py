"""The life of every manager, written once: NEW → OPEN → CLOSED, and one error for misuse.

::

    m = Manager(ms, **options)   NEW     options checked, no I/O
    await m.start()              OPEN    or: m = await Manager.open(ms, **options)
      …                                  or: async with Manager(ms, **options) as m: …
    await m.close()              CLOSED  idempotent; a manager starts once

A subclass implements ``_start`` (open what it needs) and ``_close`` (release it) and calls
``_check_open()`` at the top of every method that needs the servers. A ``_close`` that raises
leaves the manager OPEN (so a repository that could not drain can be closed again later),
unless it sets ``self._state`` itself in a ``finally``.
"""

from __future__ import annotations

import enum
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self

from ._check import not_open

if TYPE_CHECKING:
    from .connection import Connection


class Lifetime(enum.Enum):
    NEW = "not started"
    OPEN = "open"
    CLOSED = "closed"


class Managed:
    """Base of the managers: ``open``/``start``/``close``, ``async with``, ``_check_open``."""

    #: How to open it, for the NotOpenError message (e.g. "`async with X(ms) as x`").
    _usage: ClassVar[str] = "start() it first"
    _state: Lifetime = Lifetime.NEW

    @classmethod
    async def open(cls, ms: Connection, **options: Any) -> Self:
        """Create and start a manager (the non-``async with`` spelling)."""
        manager = cls(ms, **options)  # type: ignore[call-arg]
        await manager.start()
        return manager

    async def start(self) -> None:
        """Open what the manager needs (once; a closed manager cannot be started again)."""
        self._check_new()
        await self._start()
        self._state = Lifetime.OPEN

    async def close(self) -> None:
        """Release what ``start()`` opened; the connection stays open (it is yours).

        What that means per manager is its ``_close``: the hybrid flushes for at most
        ``close_timeout`` seconds, the lifecycle flushes its dirty agents, the repository
        drains its SQL writes (and stays open if it cannot).
        """
        if self._state is Lifetime.OPEN:
            await self._close()
        self._state = Lifetime.CLOSED

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def _start(self) -> None:
        """Open the bucket, start background work (subclasses)."""

    async def _close(self) -> None:
        """Flush, stop background work (subclasses)."""

    def _check_new(self) -> None:
        if self._state is not Lifetime.NEW:
            raise not_open(type(self).__name__, self._state.value,
                           "it can be started once; create a new one")

    def _check_open(self) -> None:
        if self._state is not Lifetime.OPEN:
            raise not_open(type(self).__name__, self._state.value, f"use {self._usage}")


__all__ = ["Lifetime", "Managed"]
