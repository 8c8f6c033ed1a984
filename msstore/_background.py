"""Background work: one wake-up / backoff / progress loop, and a cancel-safe event wait."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("msstore")


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """``event.wait()`` for at most ``seconds``; True if it was set.

    Not ``asyncio.wait_for``: on Python 3.11 it can swallow a cancellation that arrives as
    the event is set (gh-86296), and a caller's ``asyncio.timeout()`` around ``flush()`` would
    then never fire.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


class Worker:
    """Runs ``step`` when woken (or every ``interval``), retrying failures with capped backoff.

    The failure policy is the caller's: ``step`` raises to be retried after the backoff (the
    error is kept in ``error``), and it never loses what it was working on. ``progress`` is
    set (and replaced) after every step, so waiters can re-check their condition.
    """

    def __init__(self, name: str, step: Callable[[], Awaitable[None]], *, interval: float,
                 base_backoff: float, max_backoff: float) -> None:
        self.name = name
        self._step = step
        self.interval = interval
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.wake = asyncio.Event()
        self.progress = asyncio.Event()
        self.error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"msstore-{self.name}")

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def dead(self) -> bool:
        """True if the loop ended without being stopped (a bug: ``error`` says what)."""
        return self._task is not None and self._task.done() and not self._stopping

    def signal_progress(self) -> None:
        self.progress.set()
        self.progress = asyncio.Event()

    async def stop(self) -> None:
        self._stopping = True
        self.wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        delay = self.base_backoff
        while not self._stopping:
            await wait_event(self.wake, self.interval)
            self.wake.clear()
            try:
                await self._step()
                delay = self.base_backoff
                self.error = None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # an outage or a bug: keep the loop, keep the work
                self.error = e
                log.warning("%s: %r; retrying in %.2f s", self.name, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
            self.signal_progress()


__all__ = ["Worker", "wait_event"]
