"""One storage per layer, each implementing :class:`msstore.router.DataStorage`.

=================  ===============================  =========================================
layer              class                            ``search(query)`` means
=================  ===============================  =========================================
MEMORY_CACHE       :class:`MemoryCache`             keys starting with ``query``
DISTRIBUTED_KV     :class:`KVStore`                 keys starting with ``query`` (a listing)
RELATIONAL_DB      :class:`TaskStore`               ``str``: status; mapping: JSONB ``@>``
RELATIONAL_DB      :class:`MessageLogStore`         ``str``: channel; mapping: JSONB ``@>``
VECTOR_STORE       :class:`VectorStore`             free text, ranked by cosine similarity
=================  ===============================  =========================================

Every layer but the in-process cache encodes values with :func:`msstore.codec.dumps` before
any I/O, so a value that is not JSON or is too large fails the same way (and writes nothing)
wherever it is routed.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import asyncpg
import nats.js.errors
import orjson
from nats.js.kv import KeyValue

from ._check import optional_seconds, positive_int
from ._pg import pg_errors as _pg_errors
from .codec import MAX_VALUE_BYTES, dumps, loads
from .errors import (
    DataRejectedError,
    InvalidAgentIdError,
    InvalidKeyError,
    InvalidOptionError,
    InvalidValueError,
    NotFoundError,
    StoreUnavailableError,
)
from .keys import check_key as _check_key
from .keys import decode_key, encode_key
from .kv import DEFAULT_TTL_SECONDS, check_bucket_name, ensure_bucket
from .kv import nats_errors as _nats_errors
from .router import DataType, Hit, RoutingError, _coerce

if TYPE_CHECKING:
    from .connection import Connection


_MISSING: Any = object()


def _check_limit(limit: object) -> int:
    return positive_int("limit", limit)


def _check_pool(pool: object) -> asyncpg.Pool:
    if not isinstance(pool, asyncpg.Pool):
        raise InvalidOptionError(f"pool must be an asyncpg.Pool (ms.pool), got "
                                 f"{type(pool).__name__}")
    return pool


def _pairs(items: object, what: str) -> list[tuple[Any, Any]]:
    """``items`` (a mapping or an iterable of ``(key, value)`` pairs) as a list of pairs."""
    if isinstance(items, Mapping):
        return list(items.items())
    if isinstance(items, str | bytes) or not isinstance(items, Iterable):
        raise InvalidValueError(f"{what} takes a mapping or an iterable of (key, value) "
                                f"pairs, got {type(items).__name__}")
    pairs: list[tuple[Any, Any]] = []
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise InvalidValueError(f"{what} takes (key, value) pairs, got {item!r:.80}")
        pairs.append((item[0], item[1]))
    return pairs


def _check_ttl(ttl: object) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0 \
            or math.isinf(ttl):
        raise InvalidValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
    return float(ttl)


# --------------------------------------------------------------------------- memory


class MemoryCache:
    """In-process, bounded LRU with a TTL per entry; no I/O, so a hit costs a dict lookup.

    Values are kept by reference (not encoded): a hit hands back the very object stored, so
    do not mutate it. ``len()`` may count expired entries until they are touched or
    :meth:`purge_expired` runs; it never exceeds ``max_entries``. The clock is injectable
    (``time.monotonic`` by default) so TTLs can be tested without sleeping.
    """

    def __init__(self, *, max_entries: int = 10_000, ttl: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = positive_int("max_entries", max_entries)
        self.ttl = optional_seconds("ttl", ttl)
        if not callable(clock):
            raise InvalidOptionError(f"clock must be a callable returning seconds, got "
                                     f"{clock!r}")
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expirations = 0

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The value; ``default`` if given and the key is missing or expired, else NotFound."""
        _check_key(key)
        item = self._data.get(key)
        if item is not None:
            if item[0] > self._clock():
                self._data.move_to_end(key)
                self.hits += 1
                return item[1]
            del self._data[key]
            self.expirations += 1
        self.misses += 1
        if default is not _MISSING:
            return default
        raise NotFoundError(f"key {key!r} is not in the memory cache (never set, removed, "
                            "evicted as least recently used, or expired)")

    def set(self, key: str, value: Any, *, ttl: float | None = _MISSING) -> None:
        """Store ``value``; ``ttl`` (seconds, ``None`` = never) overrides the cache default."""
        _check_key(key)
        ttl = self.ttl if ttl is _MISSING else _check_ttl(ttl)
        expires = math.inf if ttl is None else self._clock() + ttl
        self._data[key] = (expires, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
            self.evictions += 1

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was there (expired or not)."""
        return self._data.pop(_check_key(key), None) is not None

    def purge_expired(self) -> int:
        """Drop every expired entry now; return how many (O(n), for housekeeping)."""
        now = self._clock()
        dead = [k for k, (expires, _) in self._data.items() if expires <= now]
        for k in dead:
            del self._data[k]
        self.expirations += len(dead)
        return len(dead)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        item = self._data.get(key)
        return item is not None and item[0] > self._clock()

    async def store(self, key: str, value: Any) -> str:
        self.set(key, value)
        return key

    async def retrieve(self, key: str) -> Any:
        return self.get(key)

    async def remove(self, key: str) -> None:
        self.delete(key)

    async def search(self, query: Any, *, limit: int = 10) -> list[Hit]:
        """Live entries whose key starts with ``query``, in key order (does not touch LRU)."""
        if not isinstance(query, str):
            raise InvalidValueError(f"memory-cache search takes a key prefix (str), got "
                                    f"{type(query).__name__}")
        limit = _check_limit(limit)
        now = self._clock()
        found = sorted((k, v) for k, (expires, v) in self._data.items()
                       if expires > now and k.startswith(query))
        return [Hit(k, v) for k, v in found[:limit]]


# --------------------------------------------------------------------------- NATS KV


class KVStore:
    """One JetStream KV bucket: keys through :func:`encode_key`, values through ``dumps``.

    The bucket's max age is the TTL of every entry, counted from its last write (NATS has no
    per-key TTL on ``put``). ``search(prefix)`` is a key listing, not a query: it reads every
    key's header in the bucket, so use it on buckets of thousands of keys, not millions.
    """

    def __init__(self, kv: KeyValue, *, bucket: str, ttl: float | None,
                 max_value_bytes: int = MAX_VALUE_BYTES) -> None:
        if not isinstance(kv, KeyValue):
            raise InvalidOptionError(f"kv must be a nats KeyValue bucket (use KVStore.open), "
                                     f"got {type(kv).__name__}")
        self._kv = kv
        self.bucket = check_bucket_name(bucket)
        self.ttl = optional_seconds("ttl", ttl)
        self.max_value_bytes = positive_int("max_value_bytes", max_value_bytes)

    @classmethod
    async def open(cls, ms: Connection, bucket: str, *,
                   ttl: float | None = DEFAULT_TTL_SECONDS, description: str | None = None,
                   max_value_bytes: int = MAX_VALUE_BYTES) -> KVStore:
        """Open ``bucket``, creating it (direct get, history 1, max age ``ttl``) if missing.

        An existing bucket keeps the settings it was created with; ``ttl`` reports the
        bucket's real max age.
        """
        ttl = optional_seconds("ttl", ttl)
        check_bucket_name(bucket)
        positive_int("max_value_bytes", max_value_bytes)
        if description is not None and not isinstance(description, str):
            raise InvalidOptionError(f"description must be a str or None, got {description!r}")
        with _nats_errors(f"opening bucket {bucket!r}"):
            kv = await ensure_bucket(ms.js, bucket, ttl=ttl, description=description)
            status = await kv.status()
        return cls(kv, bucket=bucket, ttl=status.ttl or None, max_value_bytes=max_value_bytes)

    async def put(self, key: str, value: Any) -> int:
        """Write ``value``; return its KV revision (the bucket stream's sequence number)."""
        encoded = encode_key(key)
        data = dumps(value, max_bytes=self.max_value_bytes)
        with _nats_errors(f"writing {key!r} to bucket {self.bucket!r}"):
            return await self._kv.put(encoded, data)

    async def store(self, key: str, value: Any) -> str:
        await self.put(key, value)
        return key

    async def retrieve(self, key: str) -> Any:
        encoded = encode_key(key)
        try:
            with _nats_errors(f"reading {key!r} from bucket {self.bucket!r}"):
                entry = await self._kv.get(encoded)
        except nats.js.errors.KeyNotFoundError as e:
            ttl = f"{self.ttl:g} s" if self.ttl else "none"
            raise NotFoundError(
                f"key {key!r} is not in bucket {self.bucket!r} (never written, removed, or "
                f"expired: the bucket's TTL is {ttl})"
            ) from e
        return loads(entry.value or b"null")

    async def remove(self, key: str) -> None:
        encoded = encode_key(key)
        with _nats_errors(f"removing {key!r} from bucket {self.bucket!r}"):
            await self._kv.delete(encoded)

    async def keys(self) -> list[str]:
        """Every live key in the bucket, decoded, sorted."""
        try:
            with _nats_errors(f"listing bucket {self.bucket!r}"):
                encoded = await self._kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        return sorted(decode_key(k) for k in encoded)

    async def search(self, query: Any, *, limit: int = 10) -> list[Hit]:
        """Entries whose decoded key starts with ``query``, in key order."""
        if not isinstance(query, str):
            raise InvalidValueError(f"KV search takes a key prefix (str), got "
                                    f"{type(query).__name__}")
        limit = _check_limit(limit)
        matches = [k for k in await self.keys() if k.startswith(query)][:limit]

        async def one(key: str) -> Hit | None:
            try:
                return Hit(key, await self.retrieve(key))
            except NotFoundError:  # removed or expired since the listing
                return None

        hits = await asyncio.gather(*(one(k) for k in matches))
        return [h for h in hits if h is not None]


# --------------------------------------------------------------------------- PostgreSQL


def _uuid(key: object, what: str) -> uuid.UUID:
    if isinstance(key, uuid.UUID):
        return key
    if isinstance(key, str):
        try:
            return uuid.UUID(key)
        except ValueError:
            pass
    raise InvalidKeyError(f"{what} must be a UUID (e.g. str(uuid.uuid4())), got {key!r}")


def _jsonb(value: Any, max_bytes: int) -> orjson.Fragment:
    """Encode once, with msstore's size limit; the JSONB codec passes a Fragment through."""
    return orjson.Fragment(dumps(value, max_bytes=max_bytes))


def _search_filter(query: Any, column: str, value: Any, what: str,
                   max_bytes: int) -> tuple[str, str | orjson.Fragment]:
    """``column = $1`` for a str query, ``payload @> $1`` for a mapping; else a typed error."""
    if isinstance(query, str):
        return f"{column} = $1", value
    if isinstance(query, Mapping):
        return "payload @> $1", _jsonb(query, max_bytes)
    raise InvalidValueError(f"{what} takes a {column} (str) or a JSONB containment filter "
                            f"(mapping), got {type(query).__name__}")


class SQLStore:
    """Base of the relational layer: one table per data type, one statement per call."""

    def __init__(self, pool: asyncpg.Pool, *, max_value_bytes: int = MAX_VALUE_BYTES) -> None:
        self._pool = _check_pool(pool)
        self.max_value_bytes = positive_int("max_value_bytes", max_value_bytes)

    @staticmethod
    def for_data_type(ms: Connection, data_type: DataType) -> SQLStore:
        """The table-backed store for ``data_type`` (TASK_INFO or MESSAGE_LOG)."""
        data_type = _coerce(DataType, data_type)
        if data_type is DataType.TASK_INFO:
            return TaskStore(ms.pool)
        if data_type is DataType.MESSAGE_LOG:
            return MessageLogStore(ms.pool)
        raise RoutingError(f"RELATIONAL_DB has no table for {data_type.name}; "
                           "it holds TASK_INFO and MESSAGE_LOG")

    def _no_table(self) -> RoutingError:
        return RoutingError(f"{type(self).__name__} has no table: use TaskStore or "
                            "MessageLogStore (SQLStore.for_data_type picks one)")

    async def store(self, key: str, value: Any) -> str:
        raise self._no_table()

    async def retrieve(self, key: str) -> Any:
        raise self._no_table()

    async def remove(self, key: str) -> None:
        raise self._no_table()

    async def search(self, query: Any, *, limit: int = 10) -> list[Hit]:
        raise self._no_table()


_TASK_COLUMNS = ("task_type", "status", "metadata", "expires_at")
_LIVE = "(expires_at IS NULL OR expires_at > now())"

_UPSERT_TASKS = """
INSERT INTO tasks.queue AS q (task_id, task_type, payload, metadata, status, expires_at)
SELECT t.task_id, t.task_type, t.payload, COALESCE(t.metadata, '{}'::jsonb),
       COALESCE(t.status, 'pending'),
       COALESCE(t.expires_at, now() + t.ttl * interval '1 second')
FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::jsonb[], $5::text[],
            $6::timestamptz[], $7::float8[])
     AS t(task_id, task_type, payload, metadata, status, expires_at, ttl)
ON CONFLICT (task_id) DO UPDATE SET
    task_type = excluded.task_type, payload = excluded.payload,
    metadata = excluded.metadata, status = excluded.status, expires_at = excluded.expires_at
"""


class TaskStore(SQLStore):
    """TASK_INFO in ``tasks.queue``: the task id (a UUID) is the key, the value the payload.

    The value is stored whole in ``payload`` and returned as stored. If it is a mapping, its
    ``task_type`` (str), ``status`` (str, default ``pending``), ``metadata`` (mapping) and
    ``expires_at`` (aware datetime or ISO-8601 str) also fill those columns; ``ttl=`` seconds
    sets ``expires_at`` from the database clock instead. A task past ``expires_at`` reads as
    missing; :meth:`purge_expired` deletes such rows.
    """

    def _row(self, key: object, value: Any, ttl: float | None) -> tuple[Any, ...]:
        task_id = _uuid(key, "a task id")
        payload = _jsonb(value, self.max_value_bytes)
        cols: dict[str, Any] = dict.fromkeys(_TASK_COLUMNS)
        if isinstance(value, Mapping):
            cols.update((c, value[c]) for c in _TASK_COLUMNS if c in value)
        for name, size in (("task_type", 50), ("status", 20)):
            v = cols[name]
            if v is not None and (not isinstance(v, str) or not v or len(v) > size):
                raise InvalidValueError(f"task {name} must be a non-empty str of at most {size} "
                                        f"characters, got {v!r}")
        metadata = cols["metadata"]
        if metadata is not None:
            if not isinstance(metadata, Mapping):
                raise InvalidValueError(f"task metadata must be a mapping, got {metadata!r}")
            metadata = _jsonb(metadata, self.max_value_bytes)
        expires_at = cols["expires_at"]
        if isinstance(expires_at, str):
            try:
                expires_at = datetime.fromisoformat(expires_at)
            except ValueError as e:
                raise InvalidValueError(f"task expires_at {expires_at!r} is not ISO-8601") from e
        if expires_at is not None and (not isinstance(expires_at, datetime)
                                       or expires_at.tzinfo is None):
            raise InvalidValueError(f"task expires_at must be a timezone-aware datetime or "
                                    f"ISO-8601 str with an offset, got {expires_at!r}")
        if expires_at is not None and ttl is not None:
            raise InvalidValueError("give either expires_at in the value or ttl=, not both")
        return (task_id, cols["task_type"], payload, metadata, cols["status"], expires_at,
                _check_ttl(ttl))

    async def store(self, key: str, value: Any, *, ttl: float | None = None) -> str:
        """Insert or replace task ``key``; return its id in canonical form."""
        return (await self.store_many([(key, value)], ttl=ttl))[0]

    async def store_many(self, items: Mapping[Any, Any] | Iterable[tuple[Any, Any]], *,
                         ttl: float | None = None) -> list[str]:
        """Upsert many tasks in one statement (``unnest``); a repeated id keeps its last value."""
        pairs = _pairs(items, "TaskStore.store_many")
        rows: dict[uuid.UUID, tuple[Any, ...]] = {}
        for key, value in pairs:
            row = self._row(key, value, ttl)
            rows[row[0]] = row
        if rows:
            columns = [list(c) for c in zip(*rows.values(), strict=True)]
            with _pg_errors(f"upserting {len(rows)} task(s)"):
                await self._pool.execute(_UPSERT_TASKS, *columns)
        return [str(k) for k in rows]

    async def retrieve(self, key: str) -> Any:
        task_id = _uuid(key, "a task id")
        with _pg_errors(f"reading task {task_id}"):
            row = await self._pool.fetchrow(
                f"SELECT payload FROM tasks.queue WHERE task_id = $1 AND {_LIVE}", task_id)
        if row is None:
            raise NotFoundError(f"task {task_id} not found (never stored, removed, or past "
                                "its expires_at)")
        return row["payload"]

    async def remove(self, key: str) -> None:
        task_id = _uuid(key, "a task id")
        with _pg_errors(f"removing task {task_id}"):
            await self._pool.execute("DELETE FROM tasks.queue WHERE task_id = $1", task_id)

    async def search(self, query: Any, *, limit: int = 10) -> list[Hit]:
        """Live tasks with status ``query`` (str) or whose payload contains ``query`` (mapping),
        oldest first."""
        limit = _check_limit(limit)
        where, arg = _search_filter(query, "status", query, "task search", self.max_value_bytes)
        with _pg_errors("searching tasks"):
            rows = await self._pool.fetch(
                f"SELECT task_id, payload FROM tasks.queue WHERE {where} AND {_LIVE} "
                "ORDER BY created_at, task_id LIMIT $2", arg, limit)
        return [Hit(str(r["task_id"]), r["payload"]) for r in rows]

    async def purge_expired(self) -> int:
        """Delete every task past its ``expires_at``; return how many."""
        with _pg_errors("purging expired tasks"):
            status = await self._pool.execute(
                "DELETE FROM tasks.queue WHERE expires_at <= now()")
        return int(status.split()[-1])


_APPEND_MESSAGES = """
INSERT INTO messages.log (message_id, agent_id, channel, payload)
SELECT t.message_id, $2, $3, t.payload
FROM unnest($1::uuid[], $4::jsonb[]) WITH ORDINALITY AS t(message_id, payload, n)
ORDER BY t.n
"""


class MessageLogStore(SQLStore):
    """MESSAGE_LOG in ``messages.log``: append-only, ordered by ``seq``.

    ``store(channel, payload)`` appends and returns the new message id; ``retrieve`` and
    ``remove`` take that id. ``search("<channel>")`` returns the channel's latest ``limit``
    messages, oldest first (a chat history); ``search({...})`` the latest messages whose
    payload contains the mapping, across channels.
    """

    def _channel(self, channel: object) -> str:
        if not isinstance(channel, str) or not channel:
            raise InvalidKeyError(f"a message-log channel must be a non-empty str, got "
                                  f"{channel!r}")
        return channel

    async def store(self, key: str, value: Any, *,
                    agent_id: uuid.UUID | str | None = None) -> str:
        """Append ``value`` to channel ``key``; return the new message id."""
        return (await self.append_many(key, [value], agent_id=agent_id))[0]

    async def append_many(self, channel: str, payloads: Sequence[Any], *,
                          agent_id: uuid.UUID | str | None = None) -> list[str]:
        """Append several messages to ``channel`` in one statement, in order; return ids."""
        channel = self._channel(channel)
        if agent_id is not None:
            try:
                agent = _uuid(agent_id, "an agent id")
            except InvalidKeyError as e:
                raise InvalidAgentIdError(str(e)) from None
        else:
            agent = None
        if isinstance(payloads, str | bytes | Mapping) or not isinstance(payloads, Iterable):
            raise InvalidValueError(f"append_many takes a sequence of payloads, got "
                                    f"{type(payloads).__name__}")
        encoded = [_jsonb(p, self.max_value_bytes) for p in payloads]
        ids = [uuid.uuid4() for _ in encoded]
        if ids:
            with _pg_errors(f"appending {len(ids)} message(s) to {channel!r}"):
                await self._pool.execute(_APPEND_MESSAGES, ids, agent, channel, encoded)
        return [str(i) for i in ids]

    async def retrieve(self, key: str) -> Any:
        message_id = _uuid(key, "a message id")
        with _pg_errors(f"reading message {message_id}"):
            row = await self._pool.fetchrow(
                "SELECT payload FROM messages.log WHERE message_id = $1", message_id)
        if row is None:
            raise NotFoundError(f"message {message_id} not found (never appended or removed)")
        return row["payload"]

    async def remove(self, key: str) -> None:
        message_id = _uuid(key, "a message id")
        with _pg_errors(f"removing message {message_id}"):
            await self._pool.execute("DELETE FROM messages.log WHERE message_id = $1",
                                     message_id)

    async def search(self, query: Any, *, limit: int = 10) -> list[Hit]:
        limit = _check_limit(limit)
        channel = self._channel(query) if isinstance(query, str) else query
        where, arg = _search_filter(query, "channel", channel, "message search",
                                    self.max_value_bytes)
        with _pg_errors("searching the message log"):
            rows = await self._pool.fetch(
                "SELECT message_id, payload FROM (SELECT message_id, payload, seq "
                f"FROM messages.log WHERE {where} ORDER BY seq DESC LIMIT $2) t ORDER BY seq",
                arg, limit)
        return [Hit(str(r["message_id"]), r["payload"]) for r in rows]


# --------------------------------------------------------------------------- vectors


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors of length ``dim``. Synchronous, like most local models.

    A model that takes milliseconds per call would stall the event loop: open the
    :class:`VectorStore` with ``offload_embedding=True`` and it runs ``embed`` in a thread.
    """

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


_WORD_RE = re.compile(r"\w+")
_STOPWORDS = frozenset(
    "a an and are as at be by do does for from how i in is it its my of on or the this to "
    "was what when where which who why with you your".split()
)


class HashingEmbedder:
    """Deterministic, dependency-free embeddings: hashed words and character trigrams.

    Each lower-cased word (minus a few stop words) adds 1 and each of its character
    trigrams 0.5 to a bucket chosen by BLAKE2b, with a hashed sign so collisions cancel
    rather than pile up; the vector is L2-normalised. It captures shared vocabulary and
    spelling variants, not meaning: good enough to teach ranking, swap in a real model
    (any :class:`Embedder`) for real use.
    """

    def __init__(self, dim: int = 256) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 8:
            raise InvalidOptionError(f"dim must be an int of at least 8, got {dim!r}")
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    def _add(self, vec: list[float], token: str, weight: float) -> None:
        h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "big")
        vec[h % self._dim] += weight if h >> 63 else -weight

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out = []
        for text in texts:
            vec = [0.0] * self._dim
            for word in _WORD_RE.findall(text.lower()):
                if word in _STOPWORDS:
                    continue
                self._add(vec, "w:" + word, 1.0)
                padded = f"<{word}>"
                for i in range(len(padded) - 2):
                    self._add(vec, "c:" + padded[i:i + 3], 0.5)
            norm = math.sqrt(sum(x * x for x in vec))
            out.append([x / norm for x in vec] if norm else vec)
        return out

    def __repr__(self) -> str:
        return f"HashingEmbedder(dim={self._dim})"


class _LayerMissing(StoreUnavailableError):
    """The server lacks what a layer needs (pgvector): the Store keeps its other layers."""


def _check_embedder(embedder: object) -> Embedder:
    if embedder is None:
        return HashingEmbedder()
    if not isinstance(embedder, Embedder):
        raise InvalidOptionError(f"embedder must have a dim and an embed(texts) method "
                                 f"(msstore.Embedder), got {type(embedder).__name__}")
    return embedder


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidOptionError(f"{name} must be a bool, got {value!r}")
    return value


def _vector_literal(vec: Sequence[float], dim: int) -> str:
    if len(vec) != dim or not all(math.isfinite(x) for x in vec):
        raise InvalidValueError(f"the embedder returned a vector of length {len(vec)} (or with "
                                f"non-finite numbers); its dim says {dim}")
    return "[" + ",".join(repr(float(x)) for x in vec) + "]"


_UPSERT_DOCS = """
INSERT INTO knowledge.documents AS d (collection, key, content, value, embedding)
SELECT $1, t.key, t.content, t.value, t.embedding::vector
FROM unnest($2::text[], $3::text[], $4::jsonb[], $5::text[]) AS t(key, content, value, embedding)
ON CONFLICT (collection, key) DO UPDATE SET
    content = excluded.content, value = excluded.value, embedding = excluded.embedding,
    updated_at = now()
"""

_SEARCH_DOCS = """
SELECT key, value, 1 - (embedding <=> $2::text::vector) AS score
FROM knowledge.documents
WHERE collection = $1 AND ($4::jsonb IS NULL OR value @> $4::jsonb)
ORDER BY embedding <=> $2::text::vector, key
LIMIT $3
"""


def pgvector_missing_message(server: str) -> str:
    """What to tell a user whose PostgreSQL has no pgvector, and how to get it."""
    return (
        f"the pgvector extension is missing on the PostgreSQL server {server}, so "
        "KNOWLEDGE_BASE (the vector store) is unavailable there. Use the embedded server "
        "(unset MSSTORE_DATABASE_URL: msstore starts PostgreSQL 18 with pgvector), or the "
        "pgvector Docker image (`docker compose up`: pgvector/pgvector:pg15), or install "
        "pgvector on that server (https://github.com/pgvector/pgvector#installation)"
    )


class VectorStore:
    """KNOWLEDGE_BASE in ``knowledge.documents``: pgvector embeddings, JSONB values.

    A value is a ``str`` (the text) or a mapping with a ``"text"`` str; the whole value is
    kept as JSONB (its other fields are the metadata, filterable with ``where=``) and the
    text is embedded. ``search(text)`` ranks a collection by cosine similarity, exactly
    (no approximate index), best first; a query with no words returns no hits.
    """

    def __init__(self, pool: asyncpg.Pool, *, collection: str = "knowledge_base",
                 embedder: Embedder | None = None, offload_embedding: bool = False,
                 max_value_bytes: int = MAX_VALUE_BYTES) -> None:
        self._pool = _check_pool(pool)
        self.collection = _check_key(collection)
        self.embedder: Embedder = _check_embedder(embedder)
        self.offload_embedding = _check_bool("offload_embedding", offload_embedding)
        self.max_value_bytes = positive_int("max_value_bytes", max_value_bytes)

    @classmethod
    async def open(cls, ms: Connection, *, collection: str = "knowledge_base",
                   embedder: Embedder | None = None,
                   offload_embedding: bool = False) -> VectorStore:
        """Check that pgvector and the table exist; raise StoreUnavailableError saying how."""
        _check_key(collection)
        _check_embedder(embedder)
        _check_bool("offload_embedding", offload_embedding)
        with _pg_errors("checking for pgvector"):
            row = await ms.pool.fetchrow(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') AS ext, "
                "EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector') AS avail,"
                " to_regclass('knowledge.documents') IS NOT NULL AS tbl, "
                "current_setting('server_version') AS version")
        assert row is not None
        server = f"{_redact(ms.database_url)} (PostgreSQL {row['version']})"
        if not row["avail"]:
            raise _LayerMissing(pgvector_missing_message(server))
        if not (row["ext"] and row["tbl"]):
            raise _LayerMissing(
                f"pgvector is available on {server} but knowledge.documents is missing: the "
                "database was migrated before pgvector was installed. Run the DO block of "
                "sql/003_knowledge_base.sql once more (it is idempotent), e.g. with psql -f"
            )
        return cls(ms.pool, collection=collection, embedder=embedder,
                   offload_embedding=offload_embedding)

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        if self.offload_embedding:
            vecs = await asyncio.to_thread(self.embedder.embed, texts)
        else:
            vecs = self.embedder.embed(texts)
        if len(vecs) != len(texts):
            raise InvalidValueError(f"the embedder returned {len(vecs)} vectors for "
                                    f"{len(texts)} texts")
        return vecs

    @staticmethod
    def _text(key: str, value: Any) -> str:
        text = value.get("text") if isinstance(value, Mapping) else value
        if not isinstance(text, str) or not _WORD_RE.search(text):
            raise InvalidValueError(
                f"knowledge-base value for {key!r} must be a str, or a mapping with a "
                f"'text' str, containing at least one word; got {type(value).__name__}"
            )
        return text

    async def store(self, key: str, value: Any) -> str:
        return (await self.store_many([(key, value)]))[0]

    async def store_many(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]]
                         ) -> list[str]:
        """Embed and upsert many documents in one statement; a repeated key keeps its last."""
        pairs = _pairs(items, "VectorStore.store_many")
        docs: dict[str, tuple[str, orjson.Fragment]] = {}
        for key, value in pairs:
            _check_key(key)
            docs[key] = (self._text(key, value), _jsonb(value, self.max_value_bytes))
        if not docs:
            return []
        keys = list(docs)
        texts = [docs[k][0] for k in keys]
        vectors = [_vector_literal(v, self.embedder.dim) for v in await self._embed(texts)]
        with _pg_errors(f"upserting {len(keys)} document(s)"):
            await self._pool.execute(_UPSERT_DOCS, self.collection, keys, texts,
                                     [docs[k][1] for k in keys], vectors)
        return keys

    async def retrieve(self, key: str) -> Any:
        _check_key(key)
        with _pg_errors(f"reading document {key!r}"):
            row = await self._pool.fetchrow(
                "SELECT value FROM knowledge.documents WHERE collection = $1 AND key = $2",
                self.collection, key)
        if row is None:
            raise NotFoundError(f"document {key!r} not in collection {self.collection!r}")
        return row["value"]

    async def remove(self, key: str) -> None:
        _check_key(key)
        with _pg_errors(f"removing document {key!r}"):
            await self._pool.execute(
                "DELETE FROM knowledge.documents WHERE collection = $1 AND key = $2",
                self.collection, key)

    async def search(self, query: Any, *, limit: int = 10,
                     where: Mapping[str, Any] | None = None) -> list[Hit]:
        """The ``limit`` documents most similar to ``query``, best first, with scores."""
        if not isinstance(query, str):
            raise InvalidValueError(f"vector search takes text (str), got "
                                    f"{type(query).__name__}")
        limit = _check_limit(limit)
        if where is not None and not isinstance(where, Mapping):
            raise InvalidValueError(f"where must be a mapping (a JSONB containment filter) or "
                                    f"None, got {type(where).__name__}")
        if not _WORD_RE.search(query):
            return []
        embedded = (await self._embed([query]))[0]
        if not any(embedded):  # a zero vector has no direction to compare by
            return []
        vector = _vector_literal(embedded, self.embedder.dim)
        flt = None if where is None else _jsonb(where, self.max_value_bytes)
        try:
            with _pg_errors("searching the knowledge base"):
                rows = await self._pool.fetch(_SEARCH_DOCS, self.collection, vector, limit,
                                              flt)
        except DataRejectedError as e:
            if not isinstance(e.__cause__, asyncpg.DataError):
                raise
            raise DataRejectedError(
                f"collection {self.collection!r} holds vectors of another dimension than "
                f"this embedder's {self.embedder.dim} ({e}); use one embedder per collection"
            ) from e
        return [Hit(r["key"], r["value"], float(r["score"])) for r in rows]


def _redact(url: str) -> str:
    """``url`` without its password, for error messages."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)


__all__ = [
    "Embedder",
    "HashingEmbedder",
    "InvalidValueError",
    "KVStore",
    "MemoryCache",
    "MessageLogStore",
    "SQLStore",
    "TaskStore",
    "VectorStore",
    "pgvector_missing_message",
]
