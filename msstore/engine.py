"""The key-level engine: the one write path and the one read path of ``agents.state`` in KV.

::

    encode_write / encode_remove ──typed errors, no I/O──▶ Encoded (agent, key, KV key, bytes)
    apply(Encoded) ──▶ KV put, or a KV delete marker ──ack──▶ StateChange (with the revision)

    read_state ──▶ KV get ──hit──▶ value
                      │ miss (no message at all; a delete marker is an authoritative miss)
                      ▼
                  the newest unflushed change of the key (``unflushed``), else the SQL row
                      ▼
                  KV create-if-absent, marked "hydrated" (compare-and-set, never a blind put)
                      │ lost the race ──▶ re-read KV: the newer write wins

Both managers are this engine plus what they add around it; their public verbs
(``write_state``, ``remove_state``, ``read_state``) are written once, in :class:`StateManager`
at the end of this module, and each manager only says what its ``_apply`` adds:

* :class:`msstore.hybrid.HybridStateManager` — write-behind: backpressure before ``apply``,
  the flusher notes each change after it and is the engine's ``unflushed`` source;
* :class:`msstore.lifecycle.StateLifecycleManager` — the per-agent view: ``apply`` and
  ``read_state`` run with the agent hydrated and its gate held, the change's key is marked
  dirty after it, and one agent is flushed in one transaction when asked.

So a key written by either is written, read, hydrated and counted the same way.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import nats.errors
from nats.js.kv import KeyValue

from . import _nats
from ._check import agent_uuid, positive_seconds
from ._managed import Managed
from ._pg import pg_errors
from ._publish import create_hydrated, publish_delete, publisher
from ._readthrough import KVRead, read_through
from .codec import dumps, loads, reencode
from .errors import NotFoundError
from .keys import join_key
from .kv import (
    DEFAULT_LEADER_WAIT,
    NOT_STORED,
    check_bucket_name,
    check_replicas,
    ensure_bucket,
    nats_error,
    nats_errors,
    retry_not_stored,
)
from .merge import READ_VALUE_TEXT, StateChange

if TYPE_CHECKING:
    from .connection import Connection

#: The engine's counters (both managers show them under these names).
COUNTERS: Final = ("writes", "removes", "reads", "kv_hits", "not_found", "hydrations",
                   "hydration_conflicts", "hydrations_uncached", "hydrations_from_log")
MISSING: Final[Any] = object()  # read_state's "no default given"


@functools.lru_cache(maxsize=16_384)
def _agent_kv_key(agent_id: uuid.UUID | str, key: str) -> tuple[uuid.UUID, str]:
    """``(agent UUID, KV key)``, memoised: agents rewrite the same keys over and over.

    Exceptions (an invalid id or key) are not cached: they are raised on every call.
    """
    agent = agent_uuid(agent_id)
    return agent, join_key(str(agent), key)


@dataclass(frozen=True, slots=True)
class Encoded:
    """A checked change not yet applied: ``data`` is the codec bytes, None for a remove."""

    agent: uuid.UUID
    key: str
    kv_key: str
    data: bytes | None


class Unflushed(Protocol):
    """Where the engine finds a change PostgreSQL may not have yet (the hybrid's flusher)."""

    async def pending(self, agent: uuid.UUID, key: str, subject: str) -> StateChange | None:
        ...


class StateEngine:
    """Key-level ``agents.state`` over one KV bucket; the managers add the rest around it."""

    def __init__(self, ms: Connection, *, bucket: str, sql_timeout: float,
                 counters: dict[str, int] | None = None,
                 after_load: Callable[[uuid.UUID, str], Awaitable[None]] | None = None,
                 replicas: int | None = None,
                 leader_wait: float = DEFAULT_LEADER_WAIT) -> None:
        self.ms = ms
        self.bucket = check_bucket_name(bucket)
        self.replicas = check_replicas(replicas)
        self.leader_wait = positive_seconds("leader_wait", leader_wait)
        self.stream = _nats.kv_stream(bucket)
        self.subject_prefix = _nats.kv_prefix(bucket)
        self.sql_timeout = sql_timeout
        self.counters: dict[str, int] = {} if counters is None else counters
        for name in COUNTERS:
            self.counters.setdefault(name, 0)
        self._after_load = after_load
        #: the newest unflushed change of a key, if the manager keeps them (None: SQL only)
        self.unflushed: Unflushed | None = None
        #: the bucket feeds a durability log (see :func:`msstore._nats.sources_drop_expectations`)
        self.logged = False
        self._kv: KeyValue | None = None

    async def open(self, *, ttl: float) -> KeyValue:
        """Open (or create, with ``ttl`` as max age) the bucket; NATS errors pass through."""
        self._kv = await ensure_bucket(self.ms.js, self.bucket, ttl=ttl, replicas=self.replicas)
        return self._kv

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None, "the manager opens the engine before using it"
        return self._kv

    # ---------------------------------------------------------------- writes

    def key(self, agent_id: object, key: str) -> tuple[uuid.UUID, str]:
        """``(agent UUID, KV key)``, or InvalidAgentIdError / InvalidKeyError."""
        if type(key) is str and (type(agent_id) is uuid.UUID or type(agent_id) is str):
            return _agent_kv_key(agent_id, key)  # memoised: the hot path of every call
        agent = agent_uuid(agent_id)
        return agent, join_key(str(agent), key)

    def encode_write(self, agent_id: object, key: str, value: Any) -> Encoded:
        """Check the id, key and value (typed errors before any I/O)."""
        agent, kv_key = self.key(agent_id, key)
        return Encoded(agent, key, kv_key, dumps(value))

    def encode_remove(self, agent_id: object, key: str) -> Encoded:
        agent, kv_key = self.key(agent_id, key)
        return Encoded(agent, key, kv_key, None)

    async def apply(self, change: Encoded) -> StateChange:
        """Put the value (or a delete marker) into KV; the change with KV's revision.

        A :class:`StoreTimeoutError` means the write may still land (NATS did not answer).
        """
        try:  # inline, not `with nats_errors(…)`: this is the hot path
            try:
                revision = await self._publish(change)
            except NOT_STORED:  # no stream leader (an election): nothing written, so again
                verb = "write" if change.data is not None else "remove"
                revision = await retry_not_stored(lambda: self._publish(change),
                                                  f"{verb} {change.key!r}", self.leader_wait)
        except (nats.errors.Error, TimeoutError) as e:
            verb = "write" if change.data is not None else "remove"
            raise nats_error(f"{verb} {change.key!r}", e) from e
        self.counters["writes" if change.data is not None else "removes"] += 1
        return StateChange(change.agent, change.key, revision, change.data)

    async def _publish(self, change: Encoded) -> int:
        subject = self.subject_prefix + change.kv_key
        if change.data is None:
            return await publish_delete(self.ms.nc, subject)
        return await publisher(self.ms.nc).publish(subject, change.data)

    # ---------------------------------------------------------------- reads

    async def read_state(self, agent_id: object, key: str, default: Any = MISSING) -> Any:
        """KV first; on a miss the newest unflushed change, else PostgreSQL (then cached in KV).

        Raises :class:`NotFoundError` when the key exists nowhere (unless ``default``).
        """
        kv = self.kv
        agent, kv_key = self.key(agent_id, key)
        subject = self.subject_prefix + kv_key
        self.counters["reads"] += 1

        async def read_kv() -> KVRead[bytes]:
            with nats_errors(f"read {key!r}"):
                return await _nats.kv_read(kv, kv_key)

        async def load() -> bytes | None:
            data = await self._newest(agent, key, subject)
            if self._after_load is not None:
                await self._after_load(agent, key)
            return data

        async def create(data: bytes) -> bool:
            if self.logged and not _nats.sources_drop_expectations(self.ms.nc):
                # NATS < 2.10.14 (see _nats): serve, do not cache — unless a write got there
                # first, which then wins like a lost compare-and-set
                if (await read_kv()).status != "miss":
                    self.counters["hydration_conflicts"] += 1
                    return False
                self.counters["hydrations_uncached"] += 1
                return True
            with nats_errors(f"hydrate {key!r}"):
                created = await retry_not_stored(
                    lambda: create_hydrated(self.ms.nc, subject, data),
                    f"hydrate {key!r}", self.leader_wait)
            self.counters["hydrations" if created else "hydration_conflicts"] += 1
            return created

        got = await read_through(read_kv, load, create, bytes)
        if got.source == "kv":
            self.counters["kv_hits"] += 1
        if got.found:
            return loads(got.value or b"null")
        self.counters["not_found"] += 1
        if default is not MISSING:
            return default
        raise NotFoundError(f"no state for agent {agent} key {key!r}")

    async def _newest(self, agent: uuid.UUID, key: str, subject: str) -> bytes | None:
        """The newest durable value of a key KV does not hold, as codec bytes (None: none).

        The newest acknowledged change that PostgreSQL may not have yet (the durability log's
        last message for the key, or the dirty set) wins over the SQL row: a key whose KV
        entry expired before its flush is served its newest value, not the row's. SQL values
        are re-encoded with the codec (compact, exactly as written), never copied as
        PostgreSQL's text form, which can be larger than what NATS accepts.
        """
        if self.unflushed is not None:
            with nats_errors(f"look up unflushed changes of {key!r}"):
                change = await self.unflushed.pending(agent, key, subject)
            if change is not None:
                self.counters["hydrations_from_log"] += 1
                return change.data  # None: deleted, and the delete is not flushed yet
        with pg_errors(f"read {key!r} (KV has no copy)"):
            text = await self.ms.pool.fetchval(READ_VALUE_TEXT, agent, key,
                                               timeout=self.sql_timeout)
        return None if text is None else reencode(text)


class StateManager(Managed):
    """The verbs both agent-state managers offer, once; each says what ``_apply`` adds.

    ``HybridStateManager`` adds backpressure and its flusher, ``StateLifecycleManager`` the
    agent's hydration, gate and dirty keys (so its verbs hydrate a COLD/EXPIRED agent first).
    """

    engine: StateEngine

    async def write_state(self, agent_id: uuid.UUID | str, key: str, value: Any) -> int:
        """Store ``value`` in KV; return its revision once KV acknowledged it.

        A :class:`StoreTimeoutError` means the write may still land (NATS did not answer).
        """
        self._check_open()
        return await self._apply(self.engine.encode_write(agent_id, key, value))

    async def remove_state(self, agent_id: uuid.UUID | str, key: str) -> int:
        """Delete ``key`` (a KV delete marker, flushed as a guarded delete); return its revision."""
        self._check_open()
        return await self._apply(self.engine.encode_remove(agent_id, key))

    async def read_state(self, agent_id: uuid.UUID | str, key: str,
                         default: Any = MISSING) -> Any:
        """KV first; on a miss the newest unflushed change, else PostgreSQL (then cached in KV).

        Raises :class:`NotFoundError` when the key exists nowhere (unless ``default``).
        """
        self._check_open()
        return await self._read(agent_id, key, default)

    async def _apply(self, change: Encoded) -> int:
        """Apply a checked change through the engine, with what the manager adds around it."""
        raise NotImplementedError

    async def _read(self, agent_id: uuid.UUID | str, key: str, default: Any) -> Any:
        return await self.engine.read_state(agent_id, key, default)


__all__ = ["COUNTERS", "MISSING", "Encoded", "StateEngine", "StateManager", "Unflushed"]
