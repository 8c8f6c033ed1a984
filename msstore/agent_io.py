"""One agent's state between PostgreSQL and KV, under the lifecycle's state machine.

::

    hydrate_agent   agents.state ──1 SELECT (text)──▶ codec bytes ──pipelined creates──▶ KV
    (single-flight)   COLD/EXPIRED → HYDRATING → ACTIVE        (never over a newer value
                                                                or a delete marker)

    flush_agent     KV ──dirty keys, 1 pipelined read──▶ merge_changes(epoch) ──▶ agents.state
                      ACTIVE → FLUSHING → ACTIVE               one transaction, or nothing

:class:`AgentIO` is the per-agent half of :class:`msstore.lifecycle.StateLifecycleManager`,
on top of the key-level :class:`msstore.engine.StateEngine`: the per-agent slots (op lock,
gate, dirty keys; :mod:`msstore.transitions`), the bucket's epoch
(:class:`msstore._nats.BucketEpoch`) and the two moves that carry a whole agent between the
tiers. The manager adds the public verbs, checkpoints and expiry on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar, cast

import asyncpg
import nats.js.errors
from nats.js.kv import KeyValue

from . import _durable, _nats
from ._check import agent_uuid, positive_int, positive_seconds
from ._pg import pg_errors
from ._publish import Created, create_pipelined
from .codec import reencode
from .engine import StateEngine, StateManager
from .errors import InvalidOptionError, StoreUnavailableError
from .keys import MAX_ENCODED_KEY, encode_key, encode_token, join_key
from .kv import DEFAULT_TTL_SECONDS, nats_errors
from .merge import LOAD_AGENT_TEXT, MergeResult, StateChange, merge_changes
from .transitions import LifecycleState, Slot, StateTracker

log = logging.getLogger("msstore.lifecycle")

T = TypeVar("T")
S = LifecycleState


@dataclass(frozen=True, slots=True)
class HydrationResult:
    """``rows`` loaded from SQL; ``created`` in KV; ``skipped`` because KV already had them."""

    agent_id: uuid.UUID
    rows: int
    created: int
    skipped: int
    sql_load: bool  # False: the agent was already ACTIVE, nothing was loaded


#: The per-agent counters; the key-level ones (writes, reads, hydrations of single keys …)
#: are :data:`msstore.engine.COUNTERS`, in the same dict.
COUNTERS: Final = (
    "sql_loads", "agent_hydrations", "hydration_joins", "hydration_failures", "keys_hydrated",
    "keys_skipped", "hydration_peak_in_flight", "flushes", "flush_failures", "rows_flushed",
    "dirty_lost", "checkpoints", "restores", "expirations", "expire_failures", "sweeps",
)


class AgentIO(StateManager):
    """Hydration and flushing of single agents, with their slots and the bucket's epoch.

    Built on a :class:`msstore.engine.StateEngine` (the key-level path): its bucket, its
    connection and its counters are this object's too.
    """

    def __init__(self, engine: StateEngine, *, ttl: float = DEFAULT_TTL_SECONDS,
                 hydrate_chunk: int = 256, nats_timeout: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not callable(clock):
            raise InvalidOptionError(f"clock must be a callable returning seconds, got "
                                     f"{clock!r}")
        self.engine = engine
        self.ms = engine.ms
        self.bucket = engine.bucket
        self.stream = engine.stream
        self.subject_prefix = engine.subject_prefix
        self.sql_timeout = engine.sql_timeout
        self.ttl = positive_seconds("ttl", ttl)
        self.hydrate_chunk = positive_int("hydrate_chunk", hydrate_chunk)
        self.nats_timeout = positive_seconds("nats_timeout", nats_timeout)
        self.clock = clock
        self.tracker = StateTracker()
        self.counters = engine.counters
        for name in COUNTERS:
            self.counters.setdefault(name, 0)
        self.last_error: BaseException | None = None
        self._slots: dict[uuid.UUID, Slot] = {}
        self._inflight: dict[uuid.UUID, asyncio.Task[HydrationResult]] = {}
        self._epoch: _nats.BucketEpoch | None = None

    async def _open_bucket(self) -> None:
        """Open the bucket (``ttl`` as max age) and read its epoch."""
        epoch = _nats.BucketEpoch(self.ms.js, self.bucket)
        with nats_errors(f"open KV bucket {self.bucket!r}"):
            await self.engine.open(ttl=self.ttl)
            await epoch.read()
        self._epoch = epoch

    def _bucket(self) -> KeyValue:
        self._check_open()
        return self.engine.kv

    def _slot(self, agent: uuid.UUID) -> Slot:
        slot = self._slots.get(agent)
        if slot is None:
            slot = self._slots[agent] = Slot(last_access=self.clock())
        return slot

    # ---------------------------------------------------------------- access to one agent

    @contextlib.asynccontextmanager
    async def _active(self, agent: uuid.UUID) -> AsyncIterator[Slot]:
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

    @contextlib.asynccontextmanager
    async def _alone(self, agent: uuid.UUID) -> AsyncIterator[Slot]:
        """Hydrate if needed, then hold the agent's op lock and its whole gate while ACTIVE."""
        while True:
            await self.hydrate_agent(agent)
            slot = self._slot(agent)
            async with slot.op_lock, slot.gate.exclusive():
                if self.tracker.state(agent) is S.ACTIVE:
                    yield slot
                    slot.last_access = self.clock()
                    return
            # expired between the hydration and the lock: hydrate again

    async def _mark_dirty(self, slot: Slot, revisions: Mapping[str, int]) -> None:
        """Mark keys dirty at the revisions KV acknowledged; notice a recreated bucket."""
        for key, revision in revisions.items():
            slot.dirty[key] = max(revision, slot.dirty.get(key, 0))
        with nats_errors(f"read the epoch of bucket {self.bucket!r}"):
            if await self._epochs().saw(list(revisions.values())):
                self._recreated()

    def _recreated(self) -> None:
        """The bucket has a new incarnation: old revisions mean nothing in it any more."""
        log.warning("KV bucket %s was recreated (epoch %d): dirty keys are flushed as news",
                    self.bucket, self._epochs().epoch)
        for slot in self._slots.values():
            for key in slot.dirty:
                slot.dirty[key] = 0  # still dirty; any revision read back is newer

    def _epochs(self) -> _nats.BucketEpoch:
        assert self._epoch is not None, "started managers have an epoch"
        return self._epoch

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
                    LOAD_AGENT_TEXT, agent, timeout=self.sql_timeout))
                with nats_errors("hydrate KV"):
                    if await self._creates_stall_a_log():
                        self.counters["hydrations_uncached"] += len(rows)
                        done = Created(0, 0, 0)
                    else:
                        done = await create_pipelined(
                            self.ms.nc, self.subject_prefix, _kv_items(agent, rows),
                            window=self.hydrate_chunk, ack_timeout=self.nats_timeout)
            except BaseException:
                self.counters["hydration_failures"] += 1
                self.tracker.transition(agent, S.COLD)
                raise
            slot.last_access = self.clock()
            self.tracker.transition(agent, S.ACTIVE)
        peak = self.counters["hydration_peak_in_flight"]
        self.counters["hydration_peak_in_flight"] = max(peak, done.peak_in_flight)
        self.counters["agent_hydrations"] += 1
        self.counters["keys_hydrated"] += done.created
        self.counters["keys_skipped"] += done.skipped
        return HydrationResult(agent, len(rows), done.created, done.skipped, sql_load=True)

    async def _creates_stall_a_log(self) -> bool:
        """True on NATS < 2.10.14 when a durability log (a ``HybridStateManager``'s stream
        flusher) copies this bucket: the log's source would refuse a compare-and-set create
        and stop copying (see :func:`msstore._nats.sources_drop_expectations`). The agent's
        keys are then served by read-through from PostgreSQL, not cached (``engine.logged``).
        """
        if self.engine.logged:
            return True
        if _nats.sources_drop_expectations(self.ms.nc):
            return False
        try:
            await self.ms.js.stream_info(_durable.log_name(self.bucket, self._epochs().epoch))
        except nats.js.errors.NotFoundError:
            return False
        log.warning("bucket %s feeds a durability log and NATS %s is older than 2.10.14: "
                    "hydrated keys are served from PostgreSQL, not cached in KV", self.bucket,
                    self.ms.nc.connected_server_version)
        self.engine.logged = True
        return True

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
            if any(c.revision < snapshot[c.key] for c in changes):  # KV went back: recreated
                with nats_errors(f"read the epoch of bucket {self.bucket!r}"):
                    if await self._epochs().recheck():
                        self._recreated()
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
                                       epoch=self._epochs().epoch,
                                       statement_timeout=self.sql_timeout)

    async def _read_changes(self, agent: uuid.UUID, keys: Iterable[str]
                            ) -> tuple[list[StateChange], list[str]]:
        """The current KV value (or delete marker) of each key, read in one pipelined batch."""
        kv = self._bucket()

        async def get(key: str) -> StateChange | str:
            try:
                entry = await kv.get(join_key(str(agent), key))
            except nats.js.errors.KeyNotFoundError as e:
                if e.op in _nats.DELETE_OPS and e.entry is not None:
                    return StateChange(agent, key, int(e.entry.revision or 0), None)
                return key
            return StateChange(agent, key, int(entry.revision or 0), entry.value or b"null")

        with nats_errors(f"read dirty keys of agent {agent}"):
            got = await asyncio.gather(*(get(k) for k in keys))
        return ([g for g in got if isinstance(g, StateChange)],
                [g for g in got if isinstance(g, str)])

    # ---------------------------------------------------------------- helpers

    async def _sql(self, what: str, aw: Awaitable[T]) -> T:
        """``await aw`` under msstore's PostgreSQL error policy (:mod:`msstore._pg`)."""
        with pg_errors(what):
            return await aw


def _kv_items(agent: uuid.UUID, rows: Iterable[asyncpg.Record]) -> list[tuple[str, bytes]]:
    """``(join_key(agent, key), codec bytes)`` per ``(key, text)`` row, the agent encoded once.

    Values are re-encoded with the codec (compact, exactly as written), never copied as
    PostgreSQL's text form, which is larger and can exceed what NATS accepts.
    """
    head = encode_token(str(agent)) + "."
    items: list[tuple[str, bytes]] = []
    for key, text in rows:
        kv_key = head + encode_key(key)
        if len(kv_key) > MAX_ENCODED_KEY:
            kv_key = join_key(str(agent), key)  # raises join_key's InvalidKeyError
        items.append((kv_key, reencode(text)))
    return items


__all__ = ["COUNTERS", "AgentIO", "HydrationResult"]
