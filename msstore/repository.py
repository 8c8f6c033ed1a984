"""Repository over two stores (seed 4.1): NATS KV for speed, ``agents.registry`` for durability.

::

    save(agent) ──▶ KV put ──ack (revision = version)──▶ caller gets agent@version
                       │
                       ▼ tracked, never fire-and-forget
            RegistryWriter (msstore._registry): coalesced per agent, one guarded statement
            per batch, retried, and parked (reported by drain()/close()) if it keeps failing

    find(id) ──▶ msstore._readthrough.read_through:
                 KV direct get ──hit──▶ agent@revision
                     │ no message at all (expired, lost)      a delete marker ──▶ NotFoundError
                     ▼
                 SQL SELECT ──row──▶ KV update(last=0)  (create-only: never over a newer write)
                     │ none                     │ lost the race ──▶ read KV again
                     ▼                          ▼
               NotFoundError          tracked SQL re-stamp: row version = new KV revision

    update(agent, expected_version) ──▶ KV update(last=expected) ──stale──▶ ConflictError

What msstore changes against the seed's pseudocode:

* the seed's key ``agent:<id>`` is not a valid NATS key; the key is ``agent.<uuid>``
  (:func:`msstore.keys.join_key`);
* the seed's ``asyncTask { db.execute(…) }`` is fire-and-forget: an error is lost, and two tasks
  for one agent can commit out of order. Here every SQL write is tracked, coalesced per agent,
  version-guarded, retried and — if it keeps failing — *reported*; what is retried and when
  writes are parked is stated once, in :class:`msstore._registry.RegistryWriter`;
* the seed's ``update`` has no concurrency control; here it is a KV compare-and-set on the
  revision, and a stale version raises :class:`~msstore.ConflictError`;
* the seed's hydrating ``kv.put`` is blind; here it is a create-only compare-and-set.

``delete`` is tracked like ``save``: a KV delete marker (its revision is the delete's version),
then a guarded ``DELETE … WHERE version < marker`` in the next batch.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import deque
from typing import TYPE_CHECKING, Final, Protocol, TypeVar, runtime_checkable

import nats.js.errors
from nats.js.kv import KeyValue

from . import _nats
from ._check import agent_uuid, non_negative_int, positive_int, positive_seconds
from ._managed import Lifetime, Managed
from ._pg import pg_errors
from ._publish import kv_update, publish_delete, publisher
from ._readthrough import KVRead, read_through
from ._registry import REGISTRY_MERGE_SQL, RegistryWriter
from .agent import MAX_STATUS_LEN as MAX_STATUS_LEN
from .agent import MAX_TYPE_LEN as MAX_TYPE_LEN
from .agent import Agent, check_agent
from .codec import dumps
from .errors import (
    BackpressureError,
    ConflictError,
    InvalidValueError,
    NotFoundError,
    PendingWritesError,
)
from .keys import join_key
from .kv import DEFAULT_TTL_SECONDS, check_bucket_name, ensure_bucket, nats_errors

if TYPE_CHECKING:
    from .connection import Connection

T = TypeVar("T")


# --------------------------------------------------------------------------- the protocol


@runtime_checkable
class Repository(Protocol[T]):
    """The seed's ``Repository<T>``: four async operations over one kind of entity."""

    async def save(self, entity: T) -> T:
        """Store ``entity``; return it with its new version."""
        ...

    async def find(self, id: uuid.UUID | str) -> T:
        """Return the entity with ``id``; raise :class:`~msstore.NotFoundError` if absent."""
        ...

    async def update(self, entity: T) -> T:
        """Store ``entity`` only if nobody wrote it since it was read."""
        ...

    async def delete(self, id: uuid.UUID | str) -> None:
        """Remove the entity with ``id`` (no error if it is already gone)."""
        ...


COUNTERS: Final = (
    "saves", "updates", "deletes", "finds", "kv_hits", "sql_fallbacks", "kv_repopulated",
    "repopulate_races", "not_found", "conflicts", "coalesced", "sql_statements", "sql_writes",
    "sql_upserted", "sql_deleted", "sql_skipped", "retries", "failures",
    "backpressure_rejections",
)


class AgentRepository(Managed):
    """Agents in KV (bucket ``bucket``, key ``agent.<uuid>``) and in ``agents.registry``.

    ::

        async with AgentRepository(ms) as repo:         # or: await AgentRepository.open(ms)
            a = await repo.save(Agent(uuid.uuid4(), "researcher"))   # a.version: KV revision
            a = await repo.update(a.replace(status="busy"))         # ConflictError if stale
            await repo.find(a.id)                       # KV, else SQL (and back into KV)
            await repo.drain()                          # every pending SQL write committed

    The connection stays yours: closing the repository drains it and stops its writer only.
    """

    _usage = "`async with AgentRepository(ms) as repo` or `repo = await AgentRepository.open(ms)`"
    _kv: KeyValue  # set by start(); every method that reads it calls _check_open() first

    def __init__(self, ms: Connection, *, bucket: str = "agents",
                 ttl: float = DEFAULT_TTL_SECONDS, batch_size: int = 1000,
                 max_retries: int = 6, base_backoff: float = 0.05, max_backoff: float = 2.0,
                 sql_timeout: float = 10.0, max_pending: int = 100_000,
                 max_lag_samples: int = 100_000) -> None:
        for name, value in (("batch_size", batch_size), ("max_pending", max_pending),
                            ("max_lag_samples", max_lag_samples)):
            positive_int(name, value)
        non_negative_int("max_retries", max_retries)
        for name, seconds in (("ttl", ttl), ("base_backoff", base_backoff),
                              ("max_backoff", max_backoff), ("sql_timeout", sql_timeout)):
            positive_seconds(name, seconds)
        self.ms = ms
        self.bucket = check_bucket_name(bucket)
        self._prefix = _nats.kv_prefix(self.bucket)
        self.ttl = float(ttl)
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.base_backoff = float(base_backoff)
        self.max_backoff = float(max_backoff)
        self.sql_timeout = float(sql_timeout)
        self.max_pending = max_pending
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._writer = RegistryWriter(ms, self.counters, batch_size=batch_size,
                                      max_retries=max_retries, base_backoff=self.base_backoff,
                                      max_backoff=self.max_backoff, sql_timeout=self.sql_timeout,
                                      max_lag_samples=max_lag_samples)

    # ---------------------------------------------------------------- lifecycle

    async def _start(self) -> None:
        """Open the bucket (max age ``ttl``, direct get) and start the SQL writer."""
        with nats_errors(f"open KV bucket {self.bucket!r}"):
            self._kv = await ensure_bucket(self.ms.js, self.bucket, ttl=self.ttl)
        self._writer.start()

    async def _close(self) -> None:
        """Drain, then stop the writer.

        If some writes cannot be committed, raises :class:`PendingWritesError` and stays
        open, so that nothing is dropped: fix PostgreSQL and call ``close()`` again.
        """
        await self.drain()
        self._state = Lifetime.CLOSED
        await self._writer.stop()

    # ---------------------------------------------------------------- the API

    @staticmethod
    def kv_key(agent_id: uuid.UUID | str) -> str:
        """The KV key of an agent: ``agent.<uuid>`` (the seed's ``agent:<id>`` is invalid)."""
        return join_key("agent", str(agent_uuid(agent_id)))

    async def save(self, agent: Agent) -> Agent:
        """Write ``agent`` to KV (last writer wins); return it with the KV revision as version.

        The SQL upsert is queued, not awaited: see :attr:`pending` and :meth:`drain`.
        """
        self._check_open()
        agent = check_agent(agent)
        self._check_backpressure()
        data = dumps(agent.to_dict())
        with nats_errors(f"save agent {agent.id}"):
            revision = await publisher(self.ms.nc).publish(self._prefix + self.kv_key(agent.id),
                                                           data)
        saved = dataclasses.replace(agent, version=revision)
        self._writer.enqueue(agent.id, revision, saved)
        self.counters["saves"] += 1
        return saved

    async def update(self, agent: Agent, expected_version: int | None = None) -> Agent:
        """Write ``agent`` only if its KV revision is still ``expected_version``.

        ``expected_version`` defaults to ``agent.version`` (the version ``find``/``save``
        returned). A stale version raises :class:`~msstore.ConflictError`.
        """
        self._check_open()
        agent = check_agent(agent)
        expected = agent.version if expected_version is None else expected_version
        if isinstance(expected, bool) or not isinstance(expected, int) or expected < 1:
            raise InvalidValueError(
                f"update() needs the version the agent was read at (>= 1), got {expected!r}; "
                "save() a new agent first, or find() it to get its version")
        self._check_backpressure()
        key, data = self.kv_key(agent.id), dumps(agent.to_dict())
        try:
            with nats_errors(f"update agent {agent.id}"):
                revision = await kv_update(self.ms.nc, self._prefix + key, data, last=expected)
        except nats.js.errors.KeyWrongLastSequenceError as e:
            revision = await self._update_after_kv_loss(agent.id, key, data, expected, e)
        updated = dataclasses.replace(agent, version=revision)
        self._writer.enqueue(agent.id, revision, updated)
        self.counters["updates"] += 1
        return updated

    async def _update_after_kv_loss(self, agent_id: uuid.UUID, key: str, data: bytes,
                                    expected: int, error: Exception) -> int:
        """KV refused the compare-and-set: conflict, unless KV merely lost the entry.

        If KV has no message at all (expired) and SQL holds exactly ``expected``, the update
        is re-tried as a create-only write, so one of several such updaters wins.
        """
        self._check_open()
        kv = self._kv
        current = await self._describe_current(agent_id, key)
        if current is None:
            sql_version = await self._sql_version(agent_id)
            if sql_version == expected:
                try:
                    with nats_errors(f"update agent {agent_id}"):
                        return await kv.update(key, data, last=0)
                except nats.js.errors.KeyWrongLastSequenceError:
                    current = await self._describe_current(agent_id, key)
            elif sql_version is not None:
                current = f"is at version {sql_version} (in SQL; KV lost it)"
        self.counters["conflicts"] += 1
        raise ConflictError(
            f"agent {agent_id} {current or 'does not exist'}, not at the expected version "
            f"{expected}: someone else wrote it first; re-read it with find(), re-apply your "
            "change and retry update()") from error

    async def _describe_current(self, agent_id: uuid.UUID, key: str) -> str | None:
        """What KV holds for ``key`` now, in words; None when it holds no message at all."""
        self._check_open()
        kv = self._kv
        try:
            with nats_errors(f"read agent {agent_id}"):
                entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError as e:
            if e.op is None:
                return None
            return f"was deleted (delete marker at version {e.entry.revision})" if e.entry \
                else "was deleted"
        return f"is at version {entry.revision}"

    async def find(self, id: uuid.UUID | str) -> Agent:
        """KV first, then ``agents.registry`` (putting the row back into KV by create-only CAS).

        Raises :class:`~msstore.NotFoundError` when the agent is in neither store, or KV holds
        a delete marker for it (a delete whose SQL half may still be pending).
        """
        self._check_open()
        kv = self._kv
        agent_id = agent_uuid(id)
        key = self.kv_key(agent_id)
        self.counters["finds"] += 1
        why = "never saved, or deleted and flushed"
        row: Agent | None = None  # the SQL row last loaded
        installed = 0  # the KV revision the row was put back at (0: it lost every race)

        async def read_kv() -> KVRead[Agent]:
            nonlocal why
            try:
                with nats_errors(f"read agent {agent_id}"):
                    entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError as e:
                if e.op is None:
                    return KVRead("miss")
                # deleted: authoritative, whatever SQL still holds
                why = (f"deleted: KV holds its delete marker at version "
                       f"{e.entry.revision if e.entry else '?'}")
                return KVRead("deleted")
            return KVRead("hit", Agent._stored(agent_id, entry.value, entry.revision or 0))

        async def load() -> bytes | None:
            nonlocal row
            row = await self._from_sql(agent_id)
            return None if row is None else dumps(row.to_dict())

        async def create(data: bytes) -> bool:
            nonlocal installed
            try:
                with nats_errors(f"repopulate agent {agent_id}"):
                    installed = await kv.update(key, data, last=0)
            except nats.js.errors.KeyWrongLastSequenceError:
                self.counters["repopulate_races"] += 1  # a newer write got there first
                return False
            return True

        def decode(data: bytes) -> Agent:
            # lost every race: the SQL row is still a committed state, at its own version
            assert row is not None
            return Agent._stored(agent_id, data, installed or row.version)

        got = await read_through(read_kv, load, create, decode)
        if got.source == "kv":
            self.counters["kv_hits"] += 1
        elif got.source == "loaded" and installed:
            self.counters["kv_repopulated"] += 1
            # SQL's version becomes the new KV revision too (same value): tracked write
            self._writer.enqueue(agent_id, installed, got.value)
        if got.value is not None:
            return got.value
        self.counters["not_found"] += 1
        raise NotFoundError(f"agent {agent_id} is not in KV bucket {self.bucket!r} nor in "
                            f"agents.registry ({why})")

    async def delete(self, id: uuid.UUID | str) -> None:
        """Put a KV delete marker now; the guarded SQL delete is queued like a save."""
        self._check_open()
        agent_id = agent_uuid(id)
        self._check_backpressure()
        with nats_errors(f"delete agent {agent_id}"):
            revision = await publish_delete(
                self.ms.nc, _nats.kv_prefix(self.bucket) + self.kv_key(agent_id))
        self._writer.enqueue(agent_id, revision, None)
        self.counters["deletes"] += 1

    # ---------------------------------------------------------------- pending SQL writes

    @property
    def pending(self) -> int:
        """Agents whose newest KV change is not in SQL yet (queued, in flight, or failed)."""
        return self._writer.pending

    @property
    def failed(self) -> list[uuid.UUID]:
        """Agents whose SQL write exhausted its retry budget (kept; retried by drain())."""
        return self._writer.failed

    @property
    def lag_samples(self) -> deque[float]:
        """Seconds from a KV ack to the SQL commit that made SQL agree, one per committed row."""
        return self._writer.lag_samples

    @property
    def last_error(self) -> BaseException | None:
        """The last error of a SQL write (kept after PostgreSQL recovers, for reports)."""
        return self._writer.last_error

    async def drain(self) -> None:
        """Wait until every change queued before this call is committed to SQL.

        Writes that failed earlier get a fresh retry budget first. Raises
        :class:`PendingWritesError` (listing the agents) if some still cannot be committed;
        they stay queued for the next ``drain()``. Bound the wait with ``asyncio.timeout()``.
        """
        self._check_open()
        await self._writer.drain()

    def _check_backpressure(self) -> None:
        pending = self.pending
        if pending >= self.max_pending:
            self.counters["backpressure_rejections"] += 1
            raise BackpressureError(
                f"{pending:,} agents wait for their SQL write (max_pending={self.max_pending:,};"
                f" last error: {self.last_error!r}); retry later or call drain()")

    async def _from_sql(self, agent_id: uuid.UUID) -> Agent | None:
        self.counters["sql_fallbacks"] += 1
        with pg_errors(f"agent {agent_id} is not in KV; read it from agents.registry"):
            row = await self.ms.pool.fetchrow(
                "SELECT agent_type, status, metadata, version FROM agents.registry "
                "WHERE agent_id = $1", agent_id, timeout=self.sql_timeout)
        if row is None:
            return None
        return Agent._trusted(agent_id, row["agent_type"], row["status"], row["metadata"],
                              row["version"])

    async def _sql_version(self, agent_id: uuid.UUID) -> int | None:
        agent = await self._from_sql(agent_id)
        return None if agent is None else agent.version

    # ---------------------------------------------------------------- observability

    def stats(self) -> dict[str, int]:
        """A snapshot of every counter plus ``pending`` and ``failed``."""
        return {**self.counters, "pending": self.pending, "failed": len(self.failed)}


__all__ = [
    "COUNTERS",
    "REGISTRY_MERGE_SQL",
    "Agent",
    "AgentRepository",
    "PendingWritesError",
    "Repository",
]
