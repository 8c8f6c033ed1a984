"""LangGraph's sync methods on an async-only msstore object: run on its loop, from elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ...errors import SyncUnsupportedError

T = TypeVar("T")


def run_sync(loop: asyncio.AbstractEventLoop | None, call: Callable[[], Awaitable[T]],
             what: str, hint: str) -> T:
    """Run ``call()`` on ``loop`` (the one ``what`` was opened on) and wait for its result.

    Only from another thread: on that loop itself waiting would deadlock it, so that (or a
    ``what`` never opened) raises :class:`SyncUnsupportedError`, ``hint`` saying what to use.
    """
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop is None or running is loop:
        raise SyncUnsupportedError(
            f"{what} is async: {hint}, or call the sync ones from a thread other than the "
            f"event loop the {what} was opened on")

    async def run() -> T:
        return await call()

    return asyncio.run_coroutine_threadsafe(run(), loop).result()


__all__ = ["run_sync"]
