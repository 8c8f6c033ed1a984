"""Agent state lifecycle (seed 4.2): COLD → HYDRATING → ACTIVE ⇄ FLUSHING → EXPIRED, enforced.

::

    StateLifecycleManager (here)          the public API, per agent
        │ write_state / remove_state / read_state: hydrate the agent if COLD/EXPIRED, hold
        │   its gate, then the engine's key-level path; a write marks the key dirty
        │ checkpoint / restore ──▶ checkpoints.py: KV watch ⇄ agents.checkpoints
        │ expire, idle sweeper (a Worker) ──▶ flush, then purge $KV.<bucket>.<agent>.>
        ▼
    AgentIO (agent_io.py)                 hydrate_agent: SQL → KV    flush_agent: KV → SQL
        ├──▶ StateTracker, Slot (transitions.py)   states and legal moves, locks, dirty keys
        ▼
    StateEngine (engine.py)               the key-level path the hybrid manager uses too:
                                          KV put / delete marker, read-through, hydration

The state machine and its diagram are in :mod:`msstore.transitions`: only the seven edges of
:data:`TRANSITIONS` are legal, any other raises :class:`IllegalTransitionError`. Every
transition is recorded and passed to listeners registered with
:meth:`StateLifecycleManager.on_transition`.

**Lifecycle or hybrid manager?** One engine (:class:`msstore.engine.StateEngine`) writes,
reads and hydrates single keys for both, with the same verbs (``write_state``,
``read_state``, ``remove_state``), the same counters and the same row format (version = KV
revision, epoch = the bucket stream's incarnation, :func:`msstore.merge.merge_changes`). They
differ in who decides when PostgreSQL gets a change:

* :class:`msstore.hybrid.HybridStateManager` — *key-level write-behind across many agents*.
  Background flushers batch every agent's changes into PostgreSQL; with the default stream
  flusher an acknowledged write survives a crash of the process (a durability log), and a
  read of a key KV lost is served its newest unflushed change. Use it for state written
  often by many agents at once.
* this manager — *the per-agent view*: an agent is loaded, worked on, checkpointed and expired
  as a unit. Nothing reaches PostgreSQL until you call ``flush_agent`` (one transaction: an
  error means nothing was committed), ``expire``, or the idle sweeper does; dirty keys live in
  this process (KV holds their values), so a crash before the flush leaves them in KV only,
  for as long as the bucket's max age keeps them.

Pick one manager per agent. Both default to the bucket ``agent_state``; run on it together,
their rows still order correctly (one stream, one epoch, one guarded merge), but a hybrid's
stream flusher then also commits this manager's writes in the background, so "nothing is
committed until ``flush_agent``" no longer holds for that bucket.

What msstore adds to the seed's pseudocode, and which shared piece does it:

* **hydration** loads the agent's rows with *one* query (values as text), re-encodes each
  with :func:`msstore.codec.reencode` (the codec's bytes) and creates them in KV pipelined
  (:func:`msstore._publish.create_pipelined`: at most ``hydrate_chunk`` compare-and-set creates in
  flight, acks counted on one inbox), so a newer value or a delete marker already in KV is
  never overwritten by an older row. Concurrent ``hydrate_agent`` calls for one agent share one
  hydration (single-flight).
* **reads** of a key KV has no message for (the bucket's max age dropped it) go through the
  engine's read-through (:func:`msstore._readthrough.read_through`): SQL row →
  create-if-absent, marked hydrated → re-read KV on a lost race.
* **flushing** reads the dirty keys from KV in one pipelined batch and writes them in one
  PostgreSQL transaction with :func:`msstore.merge.merge_changes`, under the bucket's epoch
  (:class:`msstore._nats.BucketEpoch`: read at start, read again when KV hands back a revision
  lower than one seen before — the bucket was recreated). On failure nothing is committed, the
  dirty keys stay dirty, the state reverts to ACTIVE and a :class:`StoreUnavailableError` tells
  the caller to retry. (The seed leaves an agent in FLUSHING forever when nothing is dirty;
  here every flush ends in ACTIVE.) A key written again while a flush runs stays dirty: it is
  dropped only if its flushed revision is the latest.
* **checkpoints** (:mod:`msstore.checkpoints`) snapshot the agent's live KV state into
  ``agents.checkpoints``; ``restore`` makes KV *and* SQL equal to the snapshot.
* **expiry**: an agent idle for ``idle_timeout`` is flushed, then purged from KV with one
  stream purge on the subject ``$KV.<bucket>.<agent>.>``, and becomes EXPIRED; the next access
  hydrates it again. The sweeper is a :class:`msstore._background.Worker` run every
  ``sweep_interval`` seconds.

``ttl`` is the bucket's max age (NATS has no per-key TTL on ``put``); ``idle_timeout`` must be
below it, so that an idle agent is flushed before KV drops its values.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import checkpoints
from ._background import Worker
from ._check import agent_uuid, positive_seconds
from ._managed import Lifetime
from .agent_io import COUNTERS, AgentIO, HydrationResult
from .checkpoints import RestoreResult
from .engine import Encoded, StateEngine
from .errors import IllegalTransitionError, InvalidOptionError
from .keys import encode_token
from .kv import DEFAULT_LEADER_WAIT, DEFAULT_TTL_SECONDS, nats_errors
from .transitions import (
    TRANSITIONS,
    LifecycleState,
    StateTracker,
    TransitionEvent,
    TransitionListener,
    check_transition,
)

if TYPE_CHECKING:
    import pandas as pd

    from .connection import Connection

log = logging.getLogger("msstore.lifecycle")

S = LifecycleState


class StateLifecycleManager(AgentIO):
    """Per-agent lifecycle over one KV bucket and ``agents.state``.

    ::

        async with StateLifecycleManager(ms, idle_timeout=600) as lm:
            await lm.write_state(agent, "plan", {"step": 1})  # hydrates first if COLD/EXPIRED
            await lm.flush_agent(agent)                     # one transaction
            cp = await lm.checkpoint(agent)
            await lm.restore(agent, cp)
    """

    def __init__(self, ms: Connection, *, bucket: str = "agent_state",
                 ttl: float = DEFAULT_TTL_SECONDS, idle_timeout: float | None = None,
                 sweep_interval: float | None = None, hydrate_chunk: int = 256,
                 sql_timeout: float = 30.0, nats_timeout: float = 5.0,
                 flush_on_close: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 replicas: int | None = None,
                 leader_wait: float = DEFAULT_LEADER_WAIT) -> None:
        ttl = positive_seconds("ttl", ttl)
        idle = ttl / 2 if idle_timeout is None else positive_seconds("idle_timeout",
                                                                      idle_timeout)
        if idle >= ttl:
            raise InvalidOptionError(
                f"idle_timeout ({idle} s) must be below the bucket ttl ({ttl} s): otherwise KV "
                "drops an idle agent's values before it is flushed and expired")
        if sweep_interval is not None:
            sweep_interval = positive_seconds("sweep_interval", sweep_interval)
        if not isinstance(flush_on_close, bool):
            raise InvalidOptionError(f"flush_on_close must be a bool, got {flush_on_close!r}")
        engine = StateEngine(ms, bucket=bucket,
                             sql_timeout=positive_seconds("sql_timeout", sql_timeout),
                             after_load=self._after_sql_read, replicas=replicas,
                             leader_wait=leader_wait)
        super().__init__(engine, ttl=ttl, hydrate_chunk=hydrate_chunk,
                         nats_timeout=nats_timeout, clock=clock)
        self.idle_timeout = idle
        self.sweep_interval = sweep_interval if sweep_interval is not None else min(idle / 4, 30.0)
        self.flush_on_close = flush_on_close
        self._sweeper: Worker | None = None
        self._with_sweeper = True

    # ---------------------------------------------------------------- open / close

    async def start(self, *, sweeper: bool = True) -> None:
        """Open the bucket (``ttl`` as max age), read its epoch, start the idle sweeper.

        The sweeper's failure policy: an agent whose flush or purge fails stays ACTIVE with
        its dirty keys (``expire_failures``, ``last_error``); the sweep then raises, and the
        :class:`~msstore._background.Worker` logs it and tries again after a backoff that
        starts at ``sweep_interval`` and doubles up to four times it. Nothing is dropped: an
        agent leaves KV only after its flush committed.
        """
        self._with_sweeper = sweeper
        await super().start()

    async def _start(self) -> None:
        await self._open_bucket()
        if self._with_sweeper:
            self._sweeper = Worker(f"lifecycle-sweeper-{self.bucket}", self._sweep,
                                   interval=self.sweep_interval,
                                   base_backoff=self.sweep_interval,
                                   max_backoff=4 * self.sweep_interval)
            self._sweeper.start()

    async def _close(self) -> None:
        """Stop the sweeper, then flush every ACTIVE agent (raises if a flush fails)."""
        if self._sweeper is not None:
            await self._sweeper.stop()
            self._sweeper = None
        try:
            if self.flush_on_close:
                dirty = [a for a, s in self._slots.items() if s.dirty]
                results = await asyncio.gather(*(self.flush_agent(a) for a in dirty),
                                               return_exceptions=True)
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    raise errors[0]
        finally:
            self._state = Lifetime.CLOSED

    # ---------------------------------------------------------------- observing

    def state(self, agent_id: uuid.UUID | str) -> LifecycleState:
        """The agent's current lifecycle state (COLD if never seen)."""
        return self.tracker.state(agent_uuid(agent_id))

    def on_transition(self, listener: TransitionListener) -> Callable[[], None]:
        """Register ``listener(agent_id, from, to, at)``; returns a function that removes it."""
        if not callable(listener):
            raise InvalidOptionError(f"listener must be callable, got {listener!r}")
        return self.tracker.on_transition(listener)

    def transitions(self, agent_id: uuid.UUID | str | None = None) -> list[TransitionEvent]:
        """Recorded transitions (oldest first), for one agent or all."""
        agent = None if agent_id is None else agent_uuid(agent_id)
        return [e for e in self.tracker.history if agent is None or e.agent_id == agent]

    def transitions_frame(self, agent_id: uuid.UUID | str | None = None) -> pd.DataFrame:
        """The recorded transitions as a DataFrame (agent, from, to, at)."""
        import pandas as pd

        return pd.DataFrame(
            [{"agent_id": e.agent_id, "from": e.from_state.name, "to": e.to_state.name,
              "at": e.at} for e in self.transitions(agent_id)],
            columns=["agent_id", "from", "to", "at"])

    def dirty(self, agent_id: uuid.UUID | str) -> frozenset[str]:
        """Keys written in KV and not yet committed to PostgreSQL."""
        slot = self._slots.get(agent_uuid(agent_id))
        return frozenset(slot.dirty) if slot else frozenset()

    # ---------------------------------------------------------------- reads and writes
    # write_state / remove_state / read_state are msstore.engine.StateManager's (the same
    # verbs as the hybrid manager's); what the lifecycle adds around the engine is here.

    async def _apply(self, change: Encoded) -> int:
        """Hydrate if needed and hold the agent's gate; mark the key dirty once KV has it."""
        async with self._active(change.agent) as slot:
            applied = await self.engine.apply(change)
            await self._mark_dirty(slot, {applied.key: applied.revision})
        return applied.revision

    async def _read(self, agent_id: uuid.UUID | str, key: str, default: Any) -> Any:
        """Hydrate if needed and hold the agent's gate while the engine reads through."""
        agent, _kv_key = self.engine.key(agent_id, key)  # typed errors before hydrating
        async with self._active(agent):
            return await self.engine.read_state(agent, key, default)

    async def _after_sql_read(self, agent: uuid.UUID, key: str) -> None:
        """Test seam: runs between the read-through's SQL read and its KV create."""

    # ---------------------------------------------------------------- checkpoints

    async def checkpoint(self, agent_id: uuid.UUID | str) -> uuid.UUID:
        """Snapshot the agent's live KV state into ``agents.checkpoints``; return its id.

        ``kv_revision`` is the highest KV revision among the agent's keys (delete markers
        included): no write of the agent runs during the snapshot, so it is exactly the
        agent's state as of that revision.
        """
        agent = agent_uuid(agent_id)
        kv = self._bucket()
        async with self._alone(agent):
            snap = await checkpoints.snapshot(self.ms.js, kv, self.bucket, agent,
                                              nats_timeout=self.nats_timeout)
            checkpoint_id = await checkpoints.save(self.ms.pool, agent, snap,
                                                   sql_timeout=self.sql_timeout)
        self.counters["checkpoints"] += 1
        return checkpoint_id

    async def restore(self, agent_id: uuid.UUID | str,
                      checkpoint_id: uuid.UUID | str) -> RestoreResult:
        """Make KV and ``agents.state`` equal to the checkpoint: same keys, same values.

        KV: the snapshot's keys are put again (new revisions), other keys get delete markers.
        SQL: one transaction upserts them with those revisions and deletes every other row.
        """
        agent = agent_uuid(agent_id)
        cp = agent_uuid(checkpoint_id)
        kv = self._bucket()
        values, kv_revision = await checkpoints.load(self.ms.pool, agent, cp,
                                                     sql_timeout=self.sql_timeout)
        async with self._alone(agent) as slot:
            current = await checkpoints.snapshot(self.ms.js, kv, self.bucket, agent,
                                              nats_timeout=self.nats_timeout)
            removed = sorted(set(current.revisions) - set(values))
            changes = await checkpoints.write_back(self.ms.nc, self.subject_prefix, agent,
                                                   values, removed)
            # KV now holds the checkpoint; until SQL does too, every key stays dirty
            await self._mark_dirty(slot, {c.key: c.revision for c in changes})
            await checkpoints.restore_sql(self.ms.pool, agent, changes, list(values),
                                          epoch=self._epochs().epoch,
                                          sql_timeout=self.sql_timeout)
            slot.dirty.clear()
        self.counters["restores"] += 1
        return RestoreResult(cp, kv_revision, len(values), len(removed))

    # ---------------------------------------------------------------- expiry

    async def expire(self, agent_id: uuid.UUID | str) -> bool:
        """Flush, purge the agent from KV and mark it EXPIRED now; False if it was not ACTIVE."""
        self._bucket()
        return await self._expire(agent_uuid(agent_id), idle_before=None)

    async def expire_idle(self, now: float | None = None) -> list[uuid.UUID]:
        """Expire every ACTIVE agent idle for ``idle_timeout``; return those expired.

        A failed flush leaves that agent ACTIVE (counted in ``expire_failures``) and is
        retried by the next sweep.
        """
        self._bucket()
        if now is not None and (isinstance(now, bool) or not isinstance(now, int | float)):
            raise InvalidOptionError(f"now must be a clock reading in seconds or None, got "
                                     f"{now!r}")
        expired, _failed = await self._expire_idle(now)
        return expired

    async def _expire_idle(self, now: float | None
                           ) -> tuple[list[uuid.UUID], list[BaseException]]:
        cutoff = (self.clock() if now is None else now) - self.idle_timeout
        idle = [a for a, s in self._slots.items()
                if s.last_access <= cutoff and self.tracker.state(a) is S.ACTIVE]
        results = await asyncio.gather(*(self._expire(a, idle_before=cutoff) for a in idle),
                                       return_exceptions=True)
        expired: list[uuid.UUID] = []
        failed: list[BaseException] = []
        for agent, r in zip(idle, results, strict=True):
            if isinstance(r, BaseException):
                self.counters["expire_failures"] += 1
                self.last_error = r
                failed.append(r)
                log.warning("expiring agent %s failed: %r", agent, r)
            elif r:
                expired.append(agent)
        return expired, failed

    async def _expire(self, agent: uuid.UUID, idle_before: float | None) -> bool:
        slot = self._slot(agent)
        async with slot.op_lock:
            if self.tracker.state(agent) is not S.ACTIVE:
                return False
            if idle_before is not None and slot.last_access > idle_before:
                return False  # touched since the sweep looked
            await self._flush_locked(agent)
            async with slot.gate.exclusive():
                if slot.dirty:  # a write landed between the flush and the gate
                    await self._flush_locked(agent)
                with nats_errors(f"purge agent {agent}"):
                    await self.ms.js.purge_stream(
                        self.stream, subject=f"{self.subject_prefix}{encode_token(str(agent))}.>")
                slot.dirty.clear()
                self.tracker.transition(agent, S.EXPIRED)
        self.counters["expirations"] += 1
        return True

    async def _sweep(self) -> None:
        """One sweep of the background :class:`Worker`; raises to be retried after a backoff."""
        self.counters["sweeps"] += 1
        _expired, failed = await self._expire_idle(None)
        if failed:
            raise failed[0]

__all__ = [
    "COUNTERS",
    "TRANSITIONS",
    "HydrationResult",
    "IllegalTransitionError",
    "LifecycleState",
    "RestoreResult",
    "StateLifecycleManager",
    "StateTracker",
    "TransitionEvent",
    "TransitionListener",
    "check_transition",
]
