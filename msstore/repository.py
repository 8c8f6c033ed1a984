"""Repository over two stores (seed 4.1): NATS KV for speed, ``agents.registry`` for durability.

::

    save(agent) ──▶ KV put ──ack (revision = version)──▶ caller gets agent@version
                       │
                       ▼ tracked, never fire-and-forget
            pending {agent_id: newest change}   (coalesced: one row per agent)
                       │ background writer: batches of ≤ batch_size, ONE statement each
                       ▼ INSERT … ON CONFLICT … WHERE registry.version < excluded.version
            committed ──▶ lag sample (KV ack → SQL commit)
                       │ failed 1 + max_retries times (capped exponential backoff)
                       ▼
            failed {agent_id: change}  ──▶ ``pending`` still counts it; ``drain()``/``close()``
                                           raise PendingWritesError listing it; the next
                                           ``drain()`` retries it with a fresh budget

    find(id) ──▶ KV direct get ──hit──▶ agent@revision
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
  version-guarded, retried and — if it keeps failing — *reported*;
* the seed's ``update`` has no concurrency control; here it is a KV compare-and-set on the
  revision, and a stale version raises :class:`~msstore.ConflictError`;
* the seed's hydrating ``kv.put`` is blind; here it is a create-only compare-and-set.

"Persists" means: one batch failed ``1 + max_retries`` attempts in a row (default 1 + 6; backoff
0.05 s doubling, capped at 2 s, jittered: at most about 3 s of waiting). Its writes move to the
failed set: ``pending`` still counts them, ``drain()`` and ``close()`` raise
:class:`PendingWritesError` naming them, and the next successful batch or ``drain()`` retries
them. They are never dropped while the process lives, and KV still holds their values (until
the bucket's TTL).

``delete`` is tracked like ``save``: a KV delete marker (its revision is the delete's version),
then a guarded ``DELETE … WHERE version < marker`` in the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar, runtime_checkable

import nats.js.errors
from nats.js.kv import KeyValue

from ._check import non_negative_int, not_open, positive_int, positive_seconds
from ._pg import pg_error, pg_errors, retryable
from .codec import dumps, loads
from .errors import (
    BackpressureError,
    ConflictError,
    InvalidValueError,
    NotFoundError,
    NotOpenError,
    NotSerializableError,
    PendingWritesError,
    StoreUnavailableError,
)
from .hybrid import agent_uuid
from .keys import join_key
from .kv import DEFAULT_TTL_SECONDS, check_bucket_name, ensure_bucket, nats_errors

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("msstore.repository")

T = TypeVar("T")

MAX_TYPE_LEN: Final = 100  # agents.registry.agent_type VARCHAR(100)
MAX_STATUS_LEN: Final = 20  # agents.registry.status VARCHAR(20)
KV_OPERATION: Final = "KV-Operation"


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


# --------------------------------------------------------------------------- the entity


def _check_text(name: str, value: object, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidValueError(f"Agent.{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise InvalidValueError(f"Agent.{name} must not be empty; give e.g. "
                                f"{'researcher' if name == 'type' else 'idle'!r}")
    if len(value) > limit:
        raise InvalidValueError(
            f"Agent.{name} is {len(value)} characters, above the limit of {limit} "
            f"(agents.registry column); shorten it: {value[:30]!r}…")
    return value


@dataclass(frozen=True, slots=True)
class Agent:
    """An agent as the registry knows it; validated on construction, immutable.

    ``metadata`` is normalised through JSON on construction (``{1: (2,)}`` becomes
    ``{"1": [2]}``), so what ``find`` returns compares equal to what was saved. ``version`` is
    the KV revision of the last write (0: never saved); repositories set it, callers pass it
    back to :meth:`AgentRepository.update`.
    """

    id: uuid.UUID
    type: str
    status: str = "idle"
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)
    version: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", agent_uuid(self.id))
        _check_text("type", self.type, MAX_TYPE_LEN)
        _check_text("status", self.status, MAX_STATUS_LEN)
        if not isinstance(self.metadata, dict):
            raise InvalidValueError(
                f"Agent.metadata must be a dict, got {type(self.metadata).__name__}; "
                "wrap the value, e.g. {'value': ...}")
        try:
            data = dumps(self.metadata)
        except NotSerializableError as e:
            raise NotSerializableError(f"Agent.metadata cannot be stored: {e}") from e
        object.__setattr__(self, "metadata", loads(data))
        if isinstance(self.version, bool) or not isinstance(self.version, int) \
                or self.version < 0:
            raise InvalidValueError(
                f"Agent.version must be an int >= 0 (0 = never saved), got {self.version!r}")

    def to_dict(self) -> dict[str, Any]:
        """The stored form (without ``version``: that is the KV revision, not part of the value)."""
        return {"id": str(self.id), "type": self.type, "status": self.status,
                "metadata": self.metadata}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, version: int) -> Agent:
        """Invert :meth:`to_dict`; re-validates, so a corrupted value raises a typed error."""
        if not isinstance(data, dict):
            raise InvalidValueError(f"an Agent is stored as a JSON object, got {data!r:.80}")
        return cls(id=data.get("id"), type=data.get("type"),  # type: ignore[arg-type]
                   status=data.get("status"), metadata=data.get("metadata"),  # type: ignore[arg-type]
                   version=version)

    @classmethod
    def _trusted(cls, id: uuid.UUID, type: str, status: str, metadata: dict[str, Any],
                 version: int) -> Agent:
        """Build from data msstore wrote itself (KV hit, SQL row): skips re-validation."""
        agent = object.__new__(cls)
        for name, value in (("id", id), ("type", type), ("status", status),
                            ("metadata", metadata), ("version", version)):
            object.__setattr__(agent, name, value)
        return agent

    def replace(self, **changes: Any) -> Agent:
        """A copy with ``changes`` applied (validated again); keeps ``version`` for update()."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- errors


# --------------------------------------------------------------------------- the SQL side


@dataclass(slots=True)
class _Change:
    """The newest KV change of one agent on its way to SQL; ``data=None`` is a delete."""

    agent_id: uuid.UUID
    revision: int
    agent: Agent | None
    since: float  # perf_counter of the oldest uncommitted KV ack this change stands for
    seq: int  # the oldest enqueue sequence number it stands for (drain() waits on it)


#: One statement per batch: arrays in, guarded delete and guarded upsert out.
REGISTRY_MERGE_SQL: Final = """
WITH batch AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[])
        AS b(agent_id, agent_type, status, metadata, version)
), deleted AS (
    DELETE FROM agents.registry
    USING batch
    WHERE batch.agent_type IS NULL
      AND agents.registry.agent_id = batch.agent_id
      AND agents.registry.version < batch.version
    RETURNING 1
), upserted AS (
    INSERT INTO agents.registry (agent_id, agent_type, status, metadata, version, updated_at)
    SELECT agent_id, agent_type, status, metadata::jsonb, version, now()
    FROM batch WHERE agent_type IS NOT NULL
    ON CONFLICT (agent_id) DO UPDATE
        SET agent_type = excluded.agent_type, status = excluded.status,
            metadata = excluded.metadata, version = excluded.version,
            updated_at = excluded.updated_at
        WHERE agents.registry.version < excluded.version
    RETURNING 1
)
SELECT (SELECT count(*) FROM upserted) AS upserted, (SELECT count(*) FROM deleted) AS deleted
"""

COUNTERS: Final = (
    "saves", "updates", "deletes", "finds", "kv_hits", "sql_fallbacks", "kv_repopulated",
    "repopulate_races", "not_found", "conflicts", "coalesced", "sql_statements", "sql_writes",
    "sql_upserted", "sql_deleted", "sql_skipped", "retries", "failures",
    "backpressure_rejections",
)


class _State(enum.Enum):
    NEW = "not started"
    OPEN = "open"
    CLOSED = "closed"


class AgentRepository:
    """Agents in KV (bucket ``bucket``, key ``agent.<uuid>``) and in ``agents.registry``.

    ::

        async with AgentRepository(ms) as repo:         # or: await AgentRepository.open(ms)
            a = await repo.save(Agent(uuid.uuid4(), "researcher"))   # a.version: KV revision
            a = await repo.update(a.replace(status="busy"))         # ConflictError if stale
            await repo.find(a.id)                       # KV, else SQL (and back into KV)
            await repo.drain()                          # every pending SQL write committed

    The connection stays yours: closing the repository drains it and stops its writer only.
    """

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
        self.ttl = float(ttl)
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.base_backoff = float(base_backoff)
        self.max_backoff = float(max_backoff)
        self.sql_timeout = float(sql_timeout)
        self.max_pending = max_pending
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        #: seconds from a KV ack to the SQL commit that made SQL agree, one per committed row
        self.lag_samples: deque[float] = deque(maxlen=max_lag_samples)
        self.last_error: BaseException | None = None
        self._state = _State.NEW
        self._kv: KeyValue | None = None
        self._pending: dict[uuid.UUID, _Change] = {}
        self._inflight: dict[uuid.UUID, _Change] = {}
        self._failed: dict[uuid.UUID, _Change] = {}
        self._seq = 0
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    async def open(cls, ms: Connection, **options: Any) -> AgentRepository:
        """Create and start a repository (the non-``async with`` spelling)."""
        repo = cls(ms, **options)
        await repo.start()
        return repo

    async def start(self) -> None:
        """Open the bucket (max age ``ttl``, direct get) and start the SQL writer."""
        if self._state is not _State.NEW:
            raise NotOpenError(f"cannot start an AgentRepository that is {self._state.value}")
        with nats_errors(f"open KV bucket {self.bucket!r}"):
            self._kv = await ensure_bucket(self.ms.js, self.bucket, ttl=self.ttl)
        self._writer = asyncio.create_task(self._run(), name="msstore-repository-writer")
        self._state = _State.OPEN

    async def close(self) -> None:
        """Drain, then stop the writer.

        If some writes cannot be committed, raises :class:`PendingWritesError` and stays
        open, so that nothing is dropped: fix PostgreSQL and call ``close()`` again.
        """
        if self._state is not _State.OPEN:
            return
        await self.drain()
        self._state = _State.CLOSED
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    async def __aenter__(self) -> AgentRepository:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _check_open(self) -> KeyValue:
        if self._state is not _State.OPEN or self._kv is None:
            raise not_open("AgentRepository", self._state.value,
                           "use `async with AgentRepository(ms) as repo` or "
                           "`repo = await AgentRepository.open(ms)`")
        return self._kv

    # ---------------------------------------------------------------- the API

    @staticmethod
    def kv_key(agent_id: uuid.UUID | str) -> str:
        """The KV key of an agent: ``agent.<uuid>`` (the seed's ``agent:<id>`` is invalid)."""
        return join_key("agent", str(agent_uuid(agent_id)))

    async def save(self, agent: Agent) -> Agent:
        """Write ``agent`` to KV (last writer wins); return it with the KV revision as version.

        The SQL upsert is queued, not awaited: see :attr:`pending` and :meth:`drain`.
        """
        kv = self._check_open()
        agent = _check_agent(agent)
        self._check_backpressure()
        data = dumps(agent.to_dict())
        with nats_errors(f"save agent {agent.id}"):
            revision = await kv.put(self.kv_key(agent.id), data)
        saved = dataclasses.replace(agent, version=revision)
        self._enqueue(agent.id, revision, saved)
        self.counters["saves"] += 1
        return saved

    async def update(self, agent: Agent, expected_version: int | None = None) -> Agent:
        """Write ``agent`` only if its KV revision is still ``expected_version``.

        ``expected_version`` defaults to ``agent.version`` (the version ``find``/``save``
        returned). A stale version raises :class:`~msstore.ConflictError`.
        """
        kv = self._check_open()
        agent = _check_agent(agent)
        expected = agent.version if expected_version is None else expected_version
        if isinstance(expected, bool) or not isinstance(expected, int) or expected < 1:
            raise InvalidValueError(
                f"update() needs the version the agent was read at (>= 1), got {expected!r}; "
                "save() a new agent first, or find() it to get its version")
        self._check_backpressure()
        key, data = self.kv_key(agent.id), dumps(agent.to_dict())
        try:
            with nats_errors(f"update agent {agent.id}"):
                revision = await kv.update(key, data, last=expected)
        except nats.js.errors.KeyWrongLastSequenceError as e:
            revision = await self._update_after_kv_loss(agent.id, key, data, expected, e)
        updated = dataclasses.replace(agent, version=revision)
        self._enqueue(agent.id, revision, updated)
        self.counters["updates"] += 1
        return updated

    async def _update_after_kv_loss(self, agent_id: uuid.UUID, key: str, data: bytes,
                                    expected: int, error: Exception) -> int:
        """KV refused the compare-and-set: conflict, unless KV merely lost the entry.

        If KV has no message at all (expired) and SQL holds exactly ``expected``, the update
        is re-tried as a create-only write, so one of several such updaters wins.
        """
        kv = self._check_open()
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
        kv = self._check_open()
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
        kv = self._check_open()
        agent_id = agent_uuid(id)
        key = self.kv_key(agent_id)
        self.counters["finds"] += 1
        why = "never saved, or deleted and flushed"
        agent: Agent | None = None
        for _attempt in range(3):
            try:
                with nats_errors(f"read agent {agent_id}"):
                    entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError as e:
                if e.op is not None:  # deleted: authoritative, whatever SQL still holds
                    revision = e.entry.revision if e.entry else "?"
                    why = f"deleted: KV holds its delete marker at version {revision}"
                    break
                agent = await self._from_sql(agent_id)
                if agent is None:
                    break
                try:
                    with nats_errors(f"repopulate agent {agent_id}"):
                        revision = await kv.update(key, dumps(agent.to_dict()), last=0)
                except nats.js.errors.KeyWrongLastSequenceError:
                    self.counters["repopulate_races"] += 1
                    continue  # a newer write got there first: read it from KV
                self.counters["kv_repopulated"] += 1
                # SQL's version becomes the new KV revision too (same value): tracked write
                restamped = dataclasses.replace(agent, version=revision)
                self._enqueue(agent_id, revision, restamped)
                return restamped
            else:
                self.counters["kv_hits"] += 1
                d = loads(entry.value or b"null")
                return Agent._trusted(agent_id, d["type"], d["status"], d["metadata"],
                                      entry.revision or 0)
        else:  # three lost races in a row: the SQL row is still a committed state
            if agent is not None:
                return agent
        self.counters["not_found"] += 1
        raise NotFoundError(f"agent {agent_id} is not in KV bucket {self.bucket!r} nor in "
                            f"agents.registry ({why})")

    async def delete(self, id: uuid.UUID | str) -> None:
        """Put a KV delete marker now; the guarded SQL delete is queued like a save."""
        self._check_open()
        agent_id = agent_uuid(id)
        self._check_backpressure()
        with nats_errors(f"delete agent {agent_id}"):
            ack = await self.ms.js.publish(f"$KV.{self.bucket}.{self.kv_key(agent_id)}", b"",
                                           headers={KV_OPERATION: "DEL"})
        self._enqueue(agent_id, int(ack.seq), None)
        self.counters["deletes"] += 1

    # ---------------------------------------------------------------- pending SQL writes

    @property
    def pending(self) -> int:
        """Agents whose newest KV change is not in SQL yet (queued, in flight, or failed)."""
        return len(self._pending.keys() | self._inflight.keys() | self._failed.keys())

    @property
    def failed(self) -> list[uuid.UUID]:
        """Agents whose SQL write exhausted its retry budget (kept; retried by drain())."""
        return list(self._failed)

    async def drain(self) -> None:
        """Wait until every change queued before this call is committed to SQL.

        Writes that failed earlier get a fresh retry budget first. Raises
        :class:`PendingWritesError` (listing the agents) if some still cannot be committed;
        they stay queued for the next ``drain()``. Bound the wait with ``asyncio.timeout()``.
        """
        self._check_open()
        for agent_id, change in self._failed.items():
            newer = self._pending.get(agent_id)
            if newer is None:
                self._pending[agent_id] = change
            else:  # a later write supersedes it; keep the oldest ack time and sequence
                newer.since, newer.seq = min(newer.since, change.since), min(newer.seq, change.seq)
        self._failed.clear()
        target = self._seq
        self._wake.set()
        while any(c.seq <= target for c in (*self._pending.values(),
                                             *self._inflight.values())):
            if self._writer is not None and self._writer.done():
                raise StoreUnavailableError(
                    f"the repository's SQL writer stopped: {self._writer.exception()!r}")
            await self._progress.wait()
        failed = [c.agent_id for c in self._failed.values() if c.seq <= target]
        if failed:
            shown = ", ".join(map(str, failed[:5])) + (" …" if len(failed) > 5 else "")
            raise PendingWritesError(
                f"{len(failed)} agent write(s) could not be committed to agents.registry after "
                f"{1 + self.max_retries} attempts each (last error: {self.last_error!r}): "
                f"{shown}. They are kept (and in KV): make PostgreSQL reachable, then call "
                "drain() again.", failed, self.last_error)

    def _enqueue(self, agent_id: uuid.UUID, revision: int, agent: Agent | None) -> None:
        now = time.perf_counter()
        self._seq += 1
        seen = self._pending.get(agent_id) or self._failed.pop(agent_id, None)
        if seen is None:
            self._pending[agent_id] = _Change(agent_id, revision, agent, now, self._seq)
        else:
            self.counters["coalesced"] += 1
            if seen.revision < revision:
                seen.revision, seen.agent = revision, agent
            self._pending[agent_id] = seen
        self._wake.set()

    def _check_backpressure(self) -> None:
        pending = self.pending
        if pending >= self.max_pending:
            self.counters["backpressure_rejections"] += 1
            raise BackpressureError(
                f"{pending:,} agents wait for their SQL write (max_pending={self.max_pending:,};"
                f" last error: {self.last_error!r}); retry later or call drain()")

    async def _run(self) -> None:
        """The background writer: one batch, one statement, retried, then the next batch."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                ids = list(self._pending)[:self.batch_size]
                self._inflight = {i: self._pending.pop(i) for i in ids}
                batch = list(self._inflight.values())
                committed = await self._write_with_retries(batch)
                now = time.perf_counter()
                for change in batch:
                    if committed:
                        self.lag_samples.append(now - change.since)
                    elif change.agent_id in self._pending:  # a newer write will carry it
                        newer = self._pending[change.agent_id]
                        newer.since, newer.seq = (min(newer.since, change.since),
                                                  min(newer.seq, change.seq))
                    else:
                        self._failed[change.agent_id] = change
                if not committed:
                    self.counters["failures"] += len(batch)
                elif self._failed:  # PostgreSQL is back: failed writes get a fresh budget
                    for agent_id, change in self._failed.items():
                        self._pending.setdefault(agent_id, change)
                    self._failed.clear()
                self._inflight = {}
                self._signal_progress()
            self._signal_progress()

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def _write_with_retries(self, batch: list[_Change]) -> bool:
        delay = self.base_backoff
        for attempt in range(1 + self.max_retries):
            self.counters["sql_statements"] += 1
            try:
                row = await self.ms.pool.fetchrow(
                    REGISTRY_MERGE_SQL,
                    [c.agent_id for c in batch],
                    [c.agent.type if c.agent else None for c in batch],
                    [c.agent.status if c.agent else None for c in batch],
                    [dumps(c.agent.metadata).decode() if c.agent else None for c in batch],
                    [c.revision for c in batch],
                    timeout=self.sql_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # translated by the one policy, kept for drain()'s report
                err = pg_error(f"write {len(batch)} agent(s) to agents.registry", e)
                if err is not e:
                    err.__cause__ = e
                self.last_error = err
                if not retryable(e):  # a refused value or statement fails the same way again
                    log.warning("SQL write of %d agents refused (%r); kept as failed, not "
                                "retried", len(batch), e)
                    return False
                if attempt == self.max_retries:
                    log.warning("SQL write of %d agents failed %d times (%r); kept as failed",
                                len(batch), attempt + 1, e)
                    return False
                self.counters["retries"] += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.max_backoff)
            else:
                assert row is not None
                upserted, deleted = int(row["upserted"]), int(row["deleted"])
                self.counters["sql_writes"] += len(batch)
                self.counters["sql_upserted"] += upserted
                self.counters["sql_deleted"] += deleted
                self.counters["sql_skipped"] += len(batch) - upserted - deleted
                return True
        return False  # unreachable: the loop returns on its last attempt

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
        return {**self.counters, "pending": self.pending, "failed": len(self._failed)}


def _check_agent(agent: object) -> Agent:
    if not isinstance(agent, Agent):
        raise InvalidValueError(
            f"AgentRepository stores msstore.repository.Agent, got {type(agent).__name__}; "
            "build one with Agent(id, type, status, metadata)")
    return agent


__all__ = [
    "COUNTERS",
    "REGISTRY_MERGE_SQL",
    "Agent",
    "AgentRepository",
    "PendingWritesError",
    "Repository",
]
