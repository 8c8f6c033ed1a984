"""The lifecycle's in-memory side (no I/O): the state machine, its tracker, each agent's locks.

::

                   hydration failed
              ┌─────────────────────────┐
              ▼                         │
            COLD ──first access──▶ HYDRATING ──loaded──▶ ACTIVE ──flush──▶ FLUSHING
                                        ▲                  │  ▲               │
                                        │     idle (after  │  └───committed───┘
                                        │     a flush)     ▼     or reverted
                                        └──next access── EXPIRED

Only the seven edges of :data:`TRANSITIONS` are legal; :class:`StateTracker` refuses any other
with :class:`IllegalTransitionError`, records every move and tells its listeners. Each agent
also has a :class:`Slot`: an operation lock (hydrate, flush, expire, checkpoint, restore run one
at a time), a :class:`Gate` (reads and writes share it, purge/restore/snapshot take it alone)
and its dirty keys (key → latest written KV revision).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from .errors import IllegalTransitionError

log = logging.getLogger("msstore.lifecycle")


# --------------------------------------------------------------------------- the state machine


class LifecycleState(enum.Enum):
    """Where an agent's state lives right now (the seed's five states)."""

    COLD = "cold"            # no state loaded into KV
    HYDRATING = "hydrating"  # loading from PostgreSQL into KV
    ACTIVE = "active"        # in KV, operational
    FLUSHING = "flushing"    # writing dirty keys to PostgreSQL
    EXPIRED = "expired"      # idle too long: flushed and purged from KV


S = LifecycleState

#: The legal transitions, as data. Derived from the seed's ``hydrateAgent``/``flushAgent``
#: (HYDRATING→ACTIVE, ACTIVE→FLUSHING, FLUSHING→ACTIVE on success *and* as the revert on
#: failure) plus the two its prose implies: a failed hydration falls back to COLD, an expired
#: agent is hydrated again on its next access. ACTIVE→EXPIRED happens only after a flush.
TRANSITIONS: Final[Mapping[LifecycleState, frozenset[LifecycleState]]] = {
    S.COLD: frozenset({S.HYDRATING}),
    S.HYDRATING: frozenset({S.ACTIVE, S.COLD}),
    S.ACTIVE: frozenset({S.FLUSHING, S.EXPIRED}),
    S.FLUSHING: frozenset({S.ACTIVE}),
    S.EXPIRED: frozenset({S.HYDRATING}),
}


def check_transition(from_state: LifecycleState, to_state: LifecycleState,
                     agent_id: object = None) -> None:
    """Raise :class:`IllegalTransitionError` unless ``from_state → to_state`` is in the table."""
    if to_state not in TRANSITIONS[from_state]:
        raise IllegalTransitionError(agent_id, from_state, to_state, TRANSITIONS[from_state])


@dataclass(frozen=True, slots=True)
class TransitionEvent:
    """One recorded transition; ``at`` is wall-clock seconds (``time.time()``) for charts."""

    agent_id: uuid.UUID
    from_state: LifecycleState
    to_state: LifecycleState
    at: float


TransitionListener = Callable[[uuid.UUID, LifecycleState, LifecycleState, float], None]


class StateTracker:
    """Per-agent states with the table enforced, a bounded history and listeners (no I/O)."""

    def __init__(self, *, history: int = 10_000,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._states: dict[uuid.UUID, LifecycleState] = {}
        self._listeners: list[TransitionListener] = []
        self.history: deque[TransitionEvent] = deque(maxlen=history)
        self._wall_clock = wall_clock

    def state(self, agent_id: uuid.UUID) -> LifecycleState:
        """An agent never seen is COLD."""
        return self._states.get(agent_id, S.COLD)

    def states(self) -> dict[uuid.UUID, LifecycleState]:
        return dict(self._states)

    def transition(self, agent_id: uuid.UUID, to_state: LifecycleState) -> TransitionEvent:
        """Move ``agent_id`` to ``to_state`` or raise; listeners see every legal move."""
        from_state = self.state(agent_id)
        check_transition(from_state, to_state, agent_id)
        self._states[agent_id] = to_state
        event = TransitionEvent(agent_id, from_state, to_state, self._wall_clock())
        self.history.append(event)
        for listener in list(self._listeners):
            try:
                listener(agent_id, from_state, to_state, event.at)
            except Exception:  # a broken listener must not break the state machine
                log.exception("lifecycle listener %r failed", listener)
        return event

    def on_transition(self, listener: TransitionListener) -> Callable[[], None]:
        """Call ``listener(agent_id, from, to, at)`` after each transition; returns unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def forget(self, agent_id: uuid.UUID) -> None:
        self._states.pop(agent_id, None)


# --------------------------------------------------------------------------- per-agent slot


class Gate:
    """Shared for reads/writes, exclusive for purge/restore/snapshot; exclusive waiters first."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass
class Slot:
    """One agent's locks, dirty tracker (key -> latest written revision) and last access."""

    op_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    gate: Gate = field(default_factory=Gate)
    dirty: dict[str, int] = field(default_factory=dict)
    last_access: float = 0.0


__all__ = [
    "TRANSITIONS",
    "Gate",
    "LifecycleState",
    "Slot",
    "StateTracker",
    "TransitionEvent",
    "TransitionListener",
    "check_transition",
]
