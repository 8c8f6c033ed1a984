"""Agent state lifecycle (seed 4.2): COLD → HYDRATING → ACTIVE ⇄ FLUSHING → EXPIRED, enforced.

::

                   hydration failed
              ┌─────────────────────────┐
              ▼                         │
            COLD ──first access──▶ HYDRATING ──loaded──▶ ACTIVE ──flush──▶ FLUSHING
                                        ▲                  │  ▲               │
                                        │     idle (after  │  └───committed───┘
                                        │     a flush)     ▼     or reverted
                                        └──next access── EXPIRED

Only these seven edges are legal (:data:`TRANSITIONS`, derived from the seed's code); any
other raises :class:`IllegalTransitionError`. Every transition is recorded and passed to
listeners registered with :meth:`StateLifecycleManager.on_transition`.

What msstore adds to the seed's pseudocode:

* **hydration** loads the agent's rows with *one* query and creates them in KV pipelined (at
  most ``hydrate_chunk`` publishes in flight, their acks counted on one inbox subscription, not
  one awaited put per key); each put is a compare-and-set create, so a newer value (or a delete
  marker) already in KV is never overwritten by an older row.
  Concurrent ``hydrate_agent`` calls for one agent share one hydration (single-flight).
* **flushing** reads the dirty keys from KV in one pipelined batch and writes them in one
  PostgreSQL transaction with :func:`msstore.hybrid.merge_changes` (version = KV revision).
  On failure nothing is committed, the dirty keys stay dirty, the state reverts to ACTIVE and a
  :class:`StoreUnavailableError` tells the caller to retry. (The seed also leaves an agent in
  FLUSHING forever when nothing is dirty; here every flush ends in ACTIVE.) A key written again
  while a flush runs stays dirty: it is dropped only if its flushed revision is the latest.
* **checkpoints** snapshot the agent's live KV state into ``agents.checkpoints``;
  ``kv_revision`` is the highest KV revision among the agent's keys (delete markers included)
  at snapshot time — no write of the agent runs during the snapshot, so the snapshot is exactly
  the agent's state as of that revision. ``restore`` makes KV *and* SQL equal to the snapshot.
* **expiry**: an agent idle for ``idle_timeout`` is flushed, then purged from KV with one
  stream purge on the subject ``$KV.<bucket>.<agent>.>``, and becomes EXPIRED; the next access
  hydrates it again. A background sweeper runs every ``sweep_interval`` seconds.

``ttl`` is the bucket's max age (NATS has no per-key TTL on ``put``); ``idle_timeout`` must be
below it, so that an idle agent is flushed before KV drops its values.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import asyncpg
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from ._check import not_open, positive_int, positive_seconds
from ._pg import pg_errors
from .codec import dumps, loads
from .errors import (
    IllegalTransitionError,
    InvalidOptionError,
    NotFoundError,
    NotOpenError,
    StoreUnavailableError,
)
from .hybrid import (
    KV_OPERATION,
    MergeResult,
    StateChange,
    agent_uuid,
    merge_changes,
    wait_event,
)
from .keys import MAX_ENCODED_KEY, check_key, encode_key, encode_token, join_key, split_key
from .kv import DEFAULT_TTL_SECONDS, check_bucket_name, ensure_bucket, nats_errors

if TYPE_CHECKING:
    import pandas as pd

    from .connection import Connection

log = logging.getLogger("msstore.lifecycle")

T = TypeVar("T")
_MISSING: Final = object()
_DELETE_OPS: Final = frozenset({"DEL", "PURGE"})


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


class _Gate:
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
class _Slot:
    """One agent's locks, dirty tracker (key -> latest written revision) and last access."""

    op_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    gate: _Gate = field(default_factory=_Gate)
    dirty: dict[str, int] = field(default_factory=dict)
    last_access: float = 0.0


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class HydrationResult:
    """``rows`` loaded from SQL; ``created`` in KV; ``skipped`` because KV already had them."""

    agent_id: uuid.UUID
    rows: int
    created: int
    skipped: int
    sql_load: bool  # False: the agent was already ACTIVE, nothing was loaded


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What ``restore`` did: keys written back, keys removed, the checkpoint's KV revision."""

    checkpoint_id: uuid.UUID
    kv_revision: int
    written: int
    removed: int


COUNTERS: Final = (
    "sql_loads", "hydrations", "hydration_joins", "hydration_failures", "keys_hydrated",
    "keys_skipped", "hydration_peak_in_flight", "writes", "deletes", "reads", "read_fallbacks",
    "read_races",
    "flushes", "flush_failures", "rows_flushed", "dirty_lost", "checkpoints", "restores",
    "expirations", "expire_failures", "sweeps",
)


# --------------------------------------------------------------------------- the manager


class StateLifecycleManager:
    """Per-agent lifecycle over one KV bucket and ``agents.state``.

    ::

        async with StateLifecycleManager(ms, idle_timeout=600) as lm:
            await lm.write(agent, "plan", {"step": 1})     # hydrates first if COLD/EXPIRED
            await lm.flush_agent(agent)                     # one transaction
            cp = await lm.checkpoint(agent)
            await lm.restore(agent, cp)
    """

    def __init__(self, ms: Connection, *, bucket: str = "agent_state",
                 ttl: float = DEFAULT_TTL_SECONDS, idle_timeout: float | None = None,
                 sweep_interval: float | None = None, hydrate_chunk: int = 256,
                 sql_timeout: float = 30.0, nats_timeout: float = 5.0,
                 flush_on_close: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        ttl = positive_seconds("ttl", ttl)
        idle = ttl / 2 if idle_timeout is None else positive_seconds("idle_timeout",
                                                                      idle_timeout)
        if idle >= ttl:
            raise InvalidOptionError(
                f"idle_timeout ({idle} s) must be below the bucket ttl ({ttl} s): otherwise KV "
                "drops an idle agent's values before it is flushed and expired")
        hydrate_chunk = positive_int("hydrate_chunk", hydrate_chunk)
        sql_timeout = positive_seconds("sql_timeout", sql_timeout)
        nats_timeout = positive_seconds("nats_timeout", nats_timeout)
        if sweep_interval is not None:
            sweep_interval = positive_seconds("sweep_interval", sweep_interval)
        if not isinstance(flush_on_close, bool):
            raise InvalidOptionError(f"flush_on_close must be a bool, got {flush_on_close!r}")
        if not callable(clock):
            raise InvalidOptionError(f"clock must be a callable returning seconds, got "
                                     f"{clock!r}")
        self.ms = ms
        self.bucket = check_bucket_name(bucket)
        self.stream = f"KV_{bucket}"
        self.subject_prefix = f"$KV.{bucket}."
        self.ttl = ttl
        self.idle_timeout = idle
        self.sweep_interval = sweep_interval if sweep_interval is not None else min(idle / 4, 30.0)
        self.hydrate_chunk = hydrate_chunk
        self.sql_timeout = sql_timeout
        self.nats_timeout = nats_timeout
        self.flush_on_close = flush_on_close
        self.clock = clock
        self.tracker = StateTracker()
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.last_error: BaseException | None = None
        self._slots: dict[uuid.UUID, _Slot] = {}
        self._inflight: dict[uuid.UUID, asyncio.Task[HydrationResult]] = {}
        self._kv: KeyValue | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    # ---------------------------------------------------------------- open / close

    @classmethod
    async def open(cls, ms: Connection, **options: Any) -> StateLifecycleManager:
        """Create and start a manager (the non-``async with`` spelling)."""
        lm = cls(ms, **options)
        await lm.start()
        return lm

    async def start(self, *, sweeper: bool = True) -> None:
        """Open the bucket (``ttl`` as max age) and start the idle sweeper."""
        if self._kv is not None or self._closed:
            raise NotOpenError("a StateLifecycleManager can be started once; it is "
                               f"{'closed' if self._closed else 'already started'}")
        with nats_errors(f"open KV bucket {self.bucket!r}"):
            self._kv = await ensure_bucket(self.ms.js, self.bucket, ttl=self.ttl)
        if sweeper:
            self._sweeper = asyncio.create_task(self._sweep_forever(),
                                                name=f"msstore-lifecycle-sweeper-{self.bucket}")

    async def close(self) -> None:
        """Stop the sweeper, then flush every ACTIVE agent (raises if a flush fails)."""
        if self._closed:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        try:
            if self.flush_on_close and self._kv is not None:
                dirty = [a for a, s in self._slots.items() if s.dirty]
                results = await asyncio.gather(*(self.flush_agent(a) for a in dirty),
                                               return_exceptions=True)
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    raise errors[0]
        finally:
            self._closed = True

    async def __aenter__(self) -> StateLifecycleManager:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _bucket(self) -> KeyValue:
        if self._kv is None or self._closed:
            raise not_open("StateLifecycleManager", "closed" if self._closed else "not started",
                           "use `async with StateLifecycleManager(ms) as lm` or "
                           "`await StateLifecycleManager.open(ms)`")
        return self._kv

    def _slot(self, agent: uuid.UUID) -> _Slot:
        slot = self._slots.get(agent)
        if slot is None:
            slot = self._slots[agent] = _Slot(last_access=self.clock())
        return slot

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

    @contextlib.asynccontextmanager
    async def _active(self, agent: uuid.UUID) -> AsyncIterator[_Slot]:
        """Hydrate if needed, then hold the agent's shared gate while it is ACTIVE/FLUSHING."""
        for _attempt in range(5):
            await self.hydrate_agent(agent)
            slot = self._slot(agent)
            async with slot.gate.shared():
                if self.tracker.state(agent) in (S.ACTIVE, S.FLUSHING):
                    slot.last_access = self.clock()
                    yield slot
                    return
        raise StoreUnavailableError(
            f"agent {agent} expired five times while being accessed; raise idle_timeout")

    async def write(self, agent_id: uuid.UUID | str, key: str, value: Any) -> int:
        """Put ``value`` into KV and mark ``key`` dirty; return the KV revision."""
        agent = agent_uuid(agent_id)
        kv_key = join_key(str(agent), check_key(key))
        data = dumps(value)  # typed errors before any I/O
        kv = self._bucket()
        async with self._active(agent) as slot:
            with nats_errors(f"write {key!r}"):
                revision = await kv.put(kv_key, data)
            slot.dirty[key] = max(revision, slot.dirty.get(key, 0))
        self.counters["writes"] += 1
        return revision

    async def delete(self, agent_id: uuid.UUID | str, key: str) -> int:
        """Put a KV delete marker for ``key`` and mark it dirty (flushed as a SQL delete)."""
        agent = agent_uuid(agent_id)
        kv_key = join_key(str(agent), check_key(key))
        self._bucket()
        async with self._active(agent) as slot:
            revision = await self._publish_delete(kv_key)
            slot.dirty[key] = max(revision, slot.dirty.get(key, 0))
        self.counters["deletes"] += 1
        return revision

    async def read(self, agent_id: uuid.UUID | str, key: str, default: Any = _MISSING) -> Any:
        """Read ``key`` from KV (hydrating the agent first if needed).

        A key with no KV message at all (the bucket's max age dropped it) is read from SQL and
        created in KV if still absent. Raises :class:`NotFoundError` unless ``default``.
        """
        agent = agent_uuid(agent_id)
        kv_key = join_key(str(agent), check_key(key))
        kv = self._bucket()
        self.counters["reads"] += 1
        async with self._active(agent):
            try:
                with nats_errors(f"read {key!r}"):
                    entry = await kv.get(kv_key)
                return loads(entry.value or b"null")
            except nats.js.errors.KeyNotFoundError as e:
                if e.op is None:
                    found = await self._read_through(agent, key, kv_key)
                    if found is not _MISSING:
                        return found
        if default is not _MISSING:
            return default
        raise NotFoundError(f"agent {agent} has no key {key!r}")

    async def _read_through(self, agent: uuid.UUID, key: str, kv_key: str) -> Any:
        """The SQL row, created in KV if KV still has nothing; KV's value if that race is lost.

        Losing the create-if-absent race means another writer put a newer value (or a delete
        marker) into KV after the SQL read: that value wins and is read again from KV, like the
        hybrid manager, the repository and the tiered cache do.
        """
        kv = self._bucket()
        data = b""
        for _attempt in range(3):
            text = await self._sql(f"read {key!r} of agent {agent}", self.ms.pool.fetchval(
                "SELECT value::text FROM agents.state WHERE agent_id = $1 AND key = $2",
                agent, key, timeout=self.sql_timeout))
            if text is None:
                return _MISSING
            self.counters["read_fallbacks"] += 1
            data = str(text).encode()
            await self._after_sql_read(agent, key)
            try:
                with nats_errors(f"re-create {key!r}"):
                    await kv.update(kv_key, data, last=0)
                return loads(data)
            except nats.js.errors.KeyWrongLastSequenceError:
                self.counters["read_races"] += 1
            try:
                with nats_errors(f"read {key!r}"):
                    entry = await kv.get(kv_key)
                return loads(entry.value or b"null")
            except nats.js.errors.KeyNotFoundError as e:
                if e.op is not None:
                    return _MISSING  # deleted after the SQL read: the delete wins
                # no message again (the bucket's max age dropped it): read SQL again
        return loads(data)  # three lost races in a row: the SQL row is still committed

    async def _after_sql_read(self, agent: uuid.UUID, key: str) -> None:
        """Test seam: runs between the read-through's SQL read and its KV create."""

    # ---------------------------------------------------------------- hydration

    async def hydrate_agent(self, agent_id: uuid.UUID | str) -> HydrationResult:
        """Load the agent's rows into KV (COLD/EXPIRED → HYDRATING → ACTIVE); single-flight.

        Concurrent calls for one agent await the same hydration; an ACTIVE agent is a no-op.
        """
        agent = agent_uuid(agent_id)
        self._bucket()
        task = self._inflight.get(agent)
        if task is None:
            if self.tracker.state(agent) in (S.ACTIVE, S.FLUSHING):
                return HydrationResult(agent, 0, 0, 0, sql_load=False)
            task = asyncio.create_task(self._hydrate(agent), name=f"msstore-hydrate-{agent}")
            self._inflight[agent] = task
            task.add_done_callback(lambda t: self._inflight.pop(agent, None)
                                   if self._inflight.get(agent) is t else None)
        else:
            self.counters["hydration_joins"] += 1
        return await asyncio.shield(task)

    async def _hydrate(self, agent: uuid.UUID) -> HydrationResult:
        slot = self._slot(agent)
        async with slot.op_lock:
            if self.tracker.state(agent) in (S.ACTIVE, S.FLUSHING):
                return HydrationResult(agent, 0, 0, 0, sql_load=False)
            self.tracker.transition(agent, S.HYDRATING)
            try:
                self.counters["sql_loads"] += 1
                rows = await self._sql(f"load agent {agent}", self.ms.pool.fetch(
                    "SELECT key, value::text AS value FROM agents.state WHERE agent_id = $1",
                    agent, timeout=self.sql_timeout))
                created = await self._create_all(_kv_items(agent, rows))
            except BaseException:
                self.counters["hydration_failures"] += 1
                self.tracker.transition(agent, S.COLD)
                raise
            slot.last_access = self.clock()
            self.tracker.transition(agent, S.ACTIVE)
        self.counters["hydrations"] += 1
        self.counters["keys_hydrated"] += created
        self.counters["keys_skipped"] += len(rows) - created
        return HydrationResult(agent, len(rows), created, len(rows) - created, sql_load=True)

    async def _create_all(self, items: Sequence[tuple[str, bytes]]) -> int:
        """Create-if-absent every item, at most ``hydrate_chunk`` in flight; count created.

        Each create is a compare-and-set publish, exactly what ``kv.update(key, data, last=0)``
        sends (``Nats-Expected-Last-Subject-Sequence: 0``: only if KV has no message for the
        key, so a newer value *or a delete marker* wins), but published with ``nc.publish`` and
        acknowledged on one inbox subscription for the whole hydration instead of one request
        (future, timer, JSON, dataclass) per key. The window slides: it is refilled once half
        of it is acknowledged. An ack with "wrong last sequence" counts as skipped, any other
        error is raised; no ack progress within ``nats_timeout`` raises StoreTimeoutError.
        """
        self._bucket()
        if not items:
            return 0
        nc = self.ms.nc
        window = self.hydrate_chunk
        refill_at = window // 2
        headers = {_EXPECTED_LAST_SUBJECT_SEQ: "0"}
        prefix = self.subject_prefix
        acks = _CreateAcks()
        peak = self.counters["hydration_peak_in_flight"]
        n = len(items)
        sent = 0
        with nats_errors("hydrate KV"):
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox, cb=acks.on_ack)
            try:
                while True:
                    if acks.error is not None:
                        raise acks.error
                    room = min(window - acks.in_flight, n - sent)
                    for kv_key, data in items[sent:sent + room]:
                        acks.in_flight += 1  # before the publish: its ack may come during it
                        if acks.in_flight > peak:
                            peak = self.counters["hydration_peak_in_flight"] = acks.in_flight
                        await nc.publish(prefix + kv_key, data, reply=inbox, headers=headers)
                    sent += max(room, 0)
                    acks.wake_at = refill_at if sent < n else 0
                    if acks.in_flight <= acks.wake_at:
                        if sent >= n:
                            break
                        continue
                    acks.wake.clear()
                    if not await wait_event(acks.wake, self.nats_timeout):
                        raise nats.errors.TimeoutError(
                            f"{acks.in_flight} of {n} creates not acknowledged within "
                            f"{self.nats_timeout} s") from None
            finally:
                with contextlib.suppress(nats.errors.Error):  # closed connection: no sub left
                    await sub.unsubscribe()
        if acks.error is not None:
            raise acks.error  # cannot happen after all acks, but never report a failure as done
        if acks.created + acks.skipped != n:  # pragma: no cover - a broken server
            raise StoreUnavailableError(
                f"hydration got {acks.created + acks.skipped} acks for {n} creates")
        return acks.created

    # ---------------------------------------------------------------- flushing

    async def flush_agent(self, agent_id: uuid.UUID | str) -> MergeResult:
        """ACTIVE → FLUSHING → ACTIVE: commit the dirty keys in one transaction.

        On failure the transaction rolls back, the dirty keys are kept, the agent is ACTIVE
        again and :class:`StoreUnavailableError` is raised: call ``flush_agent`` again later.
        A COLD or EXPIRED agent has nothing to flush.
        """
        agent = agent_uuid(agent_id)
        self._bucket()
        async with self._slot(agent).op_lock:
            return await self._flush_locked(agent)

    async def _flush_locked(self, agent: uuid.UUID) -> MergeResult:
        if self.tracker.state(agent) is not S.ACTIVE:
            return MergeResult(0, 0, 0)
        slot = self._slot(agent)
        self.tracker.transition(agent, S.FLUSHING)
        try:
            snapshot = dict(slot.dirty)
            changes, gone = await self._read_changes(agent, snapshot)
            result = MergeResult(0, 0, 0)
            if changes:
                result = await self._sql(f"flush {len(changes)} keys of agent {agent}",
                                         self._merge_in_transaction(changes))
        except BaseException as e:
            self.counters["flush_failures"] += 1
            self.last_error = e
            self.tracker.transition(agent, S.ACTIVE)  # revert; the dirty keys are untouched
            raise
        for change in changes:
            if slot.dirty.get(change.key, 0) <= change.revision:
                del slot.dirty[change.key]
        for key in gone:  # no KV message left (the bucket's max age dropped it): unflushable
            if slot.dirty.get(key) == snapshot[key]:
                del slot.dirty[key]
                self.counters["dirty_lost"] += 1
        self.counters["flushes"] += 1
        self.counters["rows_flushed"] += result.rows
        self.tracker.transition(agent, S.ACTIVE)
        return result

    async def _merge_in_transaction(self, changes: Sequence[StateChange]) -> MergeResult:
        async with self.ms.pool.acquire(timeout=self.sql_timeout) as conn, conn.transaction():
            return await merge_changes(cast(asyncpg.Connection, conn), changes,
                                       statement_timeout=self.sql_timeout)

    async def _read_changes(self, agent: uuid.UUID, keys: Iterable[str]
                            ) -> tuple[list[StateChange], list[str]]:
        """The current KV value (or delete marker) of each key, read in one pipelined batch."""
        kv = self._bucket()

        async def get(key: str) -> StateChange | str:
            try:
                entry = await kv.get(join_key(str(agent), key))
            except nats.js.errors.KeyNotFoundError as e:
                if e.op in _DELETE_OPS and e.entry is not None:
                    return StateChange(agent, key, int(e.entry.revision or 0), None)
                return key
            return StateChange(agent, key, int(entry.revision or 0), entry.value or b"null")

        with nats_errors(f"read dirty keys of agent {agent}"):
            got = await asyncio.gather(*(get(k) for k in keys))
        return ([g for g in got if isinstance(g, StateChange)],
                [g for g in got if isinstance(g, str)])

    # ---------------------------------------------------------------- checkpoints

    async def checkpoint(self, agent_id: uuid.UUID | str) -> uuid.UUID:
        """Snapshot the agent's live KV state into ``agents.checkpoints``; return its id."""
        agent = agent_uuid(agent_id)
        self._bucket()
        while True:
            await self.hydrate_agent(agent)
            slot = self._slot(agent)
            async with slot.op_lock, slot.gate.exclusive():
                if self.tracker.state(agent) is not S.ACTIVE:
                    continue  # expired between hydration and the lock: hydrate again
                values, _revisions, max_rev = await self._snapshot(agent)
                checkpoint_id: uuid.UUID = await self._sql(
                    f"checkpoint agent {agent}", self.ms.pool.fetchval(
                        "INSERT INTO agents.checkpoints (agent_id, state_snapshot, kv_revision) "
                        "VALUES ($1, $2::jsonb, $3) RETURNING checkpoint_id",
                        agent, {k: loads(v) for k, v in values.items()}, max_rev,
                        timeout=self.sql_timeout))
                slot.last_access = self.clock()
                break
        self.counters["checkpoints"] += 1
        return checkpoint_id

    async def _snapshot(self, agent: uuid.UUID) -> tuple[dict[str, bytes], dict[str, int], int]:
        """(live values, revision per key incl. delete markers, highest revision) from KV."""
        kv = self._bucket()
        values: dict[str, bytes] = {}
        revisions: dict[str, int] = {}
        with nats_errors(f"snapshot agent {agent}"):
            watcher = await kv.watch(f"{encode_token(str(agent))}.>")
            try:
                while (entry := await watcher.updates(  # type: ignore[no-untyped-call]
                        timeout=self.nats_timeout)) is not None:
                    key = split_key(entry.key, 1)[1]
                    revisions[key] = int(entry.revision)
                    if entry.operation in _DELETE_OPS:
                        values.pop(key, None)
                    else:
                        values[key] = entry.value or b"null"
            finally:
                await watcher.stop()  # type: ignore[no-untyped-call]
        return values, revisions, max(revisions.values(), default=0)

    async def restore(self, agent_id: uuid.UUID | str,
                      checkpoint_id: uuid.UUID | str) -> RestoreResult:
        """Make KV and ``agents.state`` equal to the checkpoint: same keys, same values.

        KV: the snapshot's keys are put again (new revisions), other keys get delete markers.
        SQL: one transaction upserts them with those revisions and deletes every other row.
        """
        agent = agent_uuid(agent_id)
        cp = agent_uuid(checkpoint_id)
        self._bucket()
        row = await self._sql(f"read checkpoint {cp}", self.ms.pool.fetchrow(
            "SELECT state_snapshot, kv_revision FROM agents.checkpoints "
            "WHERE agent_id = $1 AND checkpoint_id = $2", agent, cp, timeout=self.sql_timeout))
        if row is None:
            raise NotFoundError(f"agent {agent} has no checkpoint {cp}; list them in "
                                "agents.checkpoints")
        snapshot: dict[str, Any] = row["state_snapshot"]
        encoded = [(k, dumps(v, max_bytes=1 << 30)) for k, v in snapshot.items()]
        while True:
            await self.hydrate_agent(agent)
            slot = self._slot(agent)
            async with slot.op_lock, slot.gate.exclusive():
                if self.tracker.state(agent) is not S.ACTIVE:
                    continue
                _values, current, _rev = await self._snapshot(agent)
                removed = sorted(set(current) - set(snapshot))
                with nats_errors(f"restore agent {agent} into KV"):
                    put_revs = await asyncio.gather(*(
                        self._bucket().put(join_key(str(agent), k), d) for k, d in encoded))
                    del_revs = await asyncio.gather(*(
                        self._publish_delete(join_key(str(agent), k)) for k in removed))
                changes = [StateChange(agent, k, int(r), d)
                           for (k, d), r in zip(encoded, put_revs, strict=True)]
                changes += [StateChange(agent, k, int(r), None)
                            for k, r in zip(removed, del_revs, strict=True)]
                # KV now holds the checkpoint; until SQL does too, every key stays dirty
                slot.dirty.update({c.key: c.revision for c in changes})
                await self._sql(f"restore agent {agent} into PostgreSQL",
                                self._restore_sql(agent, changes, list(snapshot)))
                slot.dirty.clear()
                slot.last_access = self.clock()
                break
        self.counters["restores"] += 1
        return RestoreResult(cp, int(row["kv_revision"] or 0), len(encoded), len(removed))

    async def _restore_sql(self, agent: uuid.UUID, changes: Sequence[StateChange],
                           keep: list[str]) -> None:
        async with self.ms.pool.acquire(timeout=self.sql_timeout) as conn, conn.transaction():
            await merge_changes(cast(asyncpg.Connection, conn), changes,
                                statement_timeout=self.sql_timeout)
            # rows KV never held (e.g. dropped by max age) are not in the snapshot either
            await conn.execute(
                "DELETE FROM agents.state WHERE agent_id = $1 AND NOT (key = ANY($2::text[]))",
                agent, keep, timeout=self.sql_timeout)

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
        cutoff = (self.clock() if now is None else now) - self.idle_timeout
        idle = [a for a, s in self._slots.items()
                if s.last_access <= cutoff and self.tracker.state(a) is S.ACTIVE]
        results = await asyncio.gather(*(self._expire(a, idle_before=cutoff) for a in idle),
                                       return_exceptions=True)
        expired: list[uuid.UUID] = []
        for agent, r in zip(idle, results, strict=True):
            if isinstance(r, BaseException):
                self.counters["expire_failures"] += 1
                self.last_error = r
                log.warning("expiring agent %s failed: %r", agent, r)
            elif r:
                expired.append(agent)
        return expired

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

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            self.counters["sweeps"] += 1
            try:
                await self.expire_idle()
            except Exception as e:  # keep sweeping; the error is visible in last_error
                self.last_error = e
                log.warning("lifecycle sweep failed: %r", e)

    # ---------------------------------------------------------------- helpers

    async def _publish_delete(self, kv_key: str) -> int:
        with nats_errors(f"delete {kv_key!r}"):
            ack = await self.ms.js.publish(f"{self.subject_prefix}{kv_key}", b"",
                                           headers={KV_OPERATION: "DEL"})
        return int(ack.seq)

    async def _sql(self, what: str, aw: Awaitable[T]) -> T:
        """``await aw`` under msstore's PostgreSQL error policy (:mod:`msstore._pg`)."""
        with pg_errors(what):
            return await aw



_EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
#: JSStreamWrongLastSequenceErrF, JSStreamWrongLastSequenceConstantErr: KV has a message already
_WRONG_LAST_SEQUENCE: Final = frozenset({10071, 10164})


class _CreateAcks:
    """The JetStream acks of one hydration's creates, counted as they arrive on its inbox."""

    __slots__ = ("created", "error", "in_flight", "skipped", "wake", "wake_at")

    def __init__(self) -> None:
        self.in_flight = 0  # published, not acknowledged yet
        self.created = 0
        self.skipped = 0
        self.error: nats.errors.Error | None = None
        self.wake_at = 0  # wake the publisher once in_flight drops to this
        self.wake = asyncio.Event()

    async def on_ack(self, msg: Msg) -> None:
        data = msg.data
        if data and b'"error"' not in data:
            self.created += 1  # the common case, without parsing the ack
        else:
            self._unusual(msg)
        self.in_flight -= 1
        if self.in_flight <= self.wake_at or self.error is not None:
            self.wake.set()

    def _unusual(self, msg: Msg) -> None:
        resp: Any = None
        with contextlib.suppress(ValueError):
            resp = json.loads(msg.data) if msg.data else None
        if isinstance(resp, dict) and "error" not in resp:
            self.created += 1  # '"error"' was inside a value (e.g. a domain name)
            return
        err: nats.errors.Error
        if isinstance(resp, dict) and isinstance(resp["error"], dict):
            if resp["error"].get("err_code") in _WRONG_LAST_SEQUENCE:
                self.skipped += 1  # KV has a newer value or a delete marker: it wins
                return
            try:
                nats.js.errors.APIError.from_error(resp["error"])  # raises the typed error
            except nats.errors.Error as e:
                err = e
            except Exception:  # an error without the usual fields
                err = nats.js.errors.APIError(description=str(resp["error"]))
        elif msg.headers and msg.headers.get("Status") == "503":
            err = nats.js.errors.NoStreamResponseError()  # no stream listens on the subject
        else:
            err = nats.js.errors.APIError(description=f"unexpected JetStream ack {msg.data!r}")
        if self.error is None:
            self.error = err


def _kv_items(agent: uuid.UUID, rows: Iterable[asyncpg.Record]) -> list[tuple[str, bytes]]:
    """``(join_key(agent, key), value)`` per row, the agent token encoded once, not per row."""
    head = encode_token(str(agent)) + "."
    items: list[tuple[str, bytes]] = []
    for r in rows:
        kv_key = head + encode_key(r["key"])
        if len(kv_key) > MAX_ENCODED_KEY:
            kv_key = join_key(str(agent), r["key"])  # raises join_key's InvalidKeyError
        items.append((kv_key, str(r["value"]).encode()))
    return items


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
