"""The error contract: every exception leaving a public method or property is an MsstoreError.

Every public method and property of every manager and store is found by introspection and
called from a table of arguments per method name (a method missing from the tables fails
:func:`test_the_tables_cover_every_public_method`), in these situations:

* ``bad``    — bad options and arguments (wrong types, negative numbers, bad keys and ids),
  on an open object: the specific subclass is asserted;
* ``before`` — before ``start()``/``open()``: NotOpenError, unless the call is in-memory only;
* ``after``  — after ``close()``: the same;
* ``closed`` — after the *connection* was closed under open objects;
* ``pg-down``   — a private embedded PostgreSQL stopped for real (``services.down``);
* ``nats-down`` — a private nats-server killed with ``kill -9``.

Each call is bounded by ``asyncio.timeout(CALL_TIMEOUT)``; the timeout expiring means the call
hung, which fails like an untyped exception. Every call must be typed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import msstore
from msstore import (
    Agent,
    AgentRepository,
    DataType,
    HybridStateManager,
    KVStore,
    MemoryCache,
    MessageLogStore,
    StateLifecycleManager,
    Store,
    TieredCacheRepository,
    VectorStore,
    services,
)
from msstore.codec import loads
from msstore.errors import (
    InvalidAgentIdError,
    InvalidKeyError,
    InvalidOptionError,
    InvalidValueError,
    MsstoreError,
    NotFoundError,
    NotOpenError,
    NotSerializableError,
    RoutingError,
    StoreUnavailableError,
)
from msstore.keys import join_key
from msstore.layers import SQLStore, TaskStore
from tests.integration.conftest import kill9, private_nats_url

CALL_TIMEOUT = 8.0  # seconds; each call is bounded by it: expiring means the call hung


#: Calls that need no server and no open state: they may succeed before open and after close.
IN_MEMORY: dict[str, set[str]] = {
    "StateLifecycleManager": {"state", "dirty", "transitions", "transitions_frame",
                              "on_transition", "close"},
    "AgentRepository": {"kv_key", "stats", "pending", "failed", "lag_samples", "last_error",
                        "close"},
    "HybridStateManager": {"backlog", "counters", "metrics", "last_error", "close"},
    "TieredCacheRepository": {"calls", "clear_l1", "evict", "evict_expired", "kv_key", "peek",
                              "peek_entry", "samples", "seen_revision", "stats",
                              "invalidation_latencies", "close"},
    "Store": {"router", "unavailable", "close"},
}
MANAGERS = tuple(IN_MEMORY)
LAYERS = ("KVStore", "SQLStore", "TaskStore", "MessageLogStore", "VectorStore", "MemoryCache")
CLASSES: dict[str, type] = {
    "HybridStateManager": HybridStateManager, "StateLifecycleManager": StateLifecycleManager,
    "AgentRepository": AgentRepository, "TieredCacheRepository": TieredCacheRepository,
    "Store": Store, "KVStore": KVStore, "SQLStore": SQLStore, "TaskStore": TaskStore,
    "MessageLogStore": MessageLogStore, "VectorStore": VectorStore, "MemoryCache": MemoryCache,
}
#: Called last, in this order: they change whether the object is open.
LAST = ("open", "start", "close")


def public_api(cls: type) -> list[str]:
    """Public methods (incl. class/static methods) and properties, by introspection."""
    names = []
    for name in dir(cls):
        if name.startswith("_"):
            continue
        attr = inspect.getattr_static(cls, name)
        if isinstance(attr, property | staticmethod | classmethod) or inspect.isfunction(attr):
            names.append(name)
    return sorted(names, key=lambda n: (n in LAST, LAST.index(n) if n in LAST else 0, n))


def takes_arguments(cls: type, name: str) -> bool:
    attr = inspect.getattr_static(cls, name)
    if isinstance(attr, property):
        return False
    params = [p for p in inspect.signature(getattr(cls, name)).parameters.values()
              if p.name not in ("self", "ms", "options", "repository")]
    return bool(params)


# --------------------------------------------------------------------------- the tables


@dataclass
class Ctx:
    """What the argument tables draw from; one per situation."""

    ms: msstore.Connection
    unique: Callable[[str], str]
    agent: uuid.UUID = field(default_factory=uuid.uuid4)
    task_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    repo: AgentRepository | None = None

    @property
    def entity(self) -> Agent:
        return Agent(self.agent, "tester")


Call = tuple[tuple[Any, ...], dict[str, Any]]

FAST_LM: dict[str, Any] = {"sql_timeout": 2.0, "nats_timeout": 1.0, "sweep_interval": 3600.0}
FAST_REPO: dict[str, Any] = {"sql_timeout": 2.0, "max_retries": 1, "base_backoff": 0.01,
                             "max_backoff": 0.02}
FAST_HSM: dict[str, Any] = {"flusher": "dirty-set", "sql_timeout": 2.0, "close_timeout": 2.0,
                            "base_backoff": 0.01, "max_backoff": 0.05, "flush_interval": 0.2}
FAST_CACHE: dict[str, Any] = {"entity_type": Agent, "l1_ttl": 30.0}


def good_calls(cls: str, c: Ctx) -> dict[str, list[Call]]:
    """Well-formed arguments per method name (several variants where the layer differs)."""
    a, ms = c.agent, c.ms
    one: Callable[..., list[Call]] = lambda *args, **kw: [(args, kw)]  # noqa: E731
    table: dict[str, dict[str, list[Call]]] = {
        "StateLifecycleManager": {
            "write_state": one(a, "k", 1), "remove_state": one(a, "k"),
            "read_state": one(a, "k"), "dirty": one(a), "state": one(a), "transitions": one(a),
            "transitions_frame": one(a), "on_transition": one(lambda *_: None),
            "hydrate_agent": one(a), "flush_agent": one(a), "checkpoint": one(a),
            "restore": one(a, uuid.uuid4()), "expire": one(a), "expire_idle": one(),
            "open": one(ms, bucket=c.unique("lm"), **FAST_LM), "start": one(), "close": one()},
        "AgentRepository": {
            "save": one(c.entity), "find": one(uuid.uuid4()),  # never saved: KV misses
            "update": one(c.entity.replace(version=1)),
            "delete": one(a), "drain": one(), "kv_key": one(a), "stats": one(),
            "pending": one(), "failed": one(), "lag_samples": one(), "last_error": one(),
            "open": one(ms, bucket=c.unique("repo"), **FAST_REPO), "start": one(),
            "close": one()},
        "HybridStateManager": {
            "write_state": one(a, "k", 1), "read_state": one(a, "k"),
            "remove_state": one(a, "k"), "flush": one(), "backlog": one(), "counters": one(),
            "metrics": one(), "purge_tombstones": one(), "last_error": one(),
            "open": one(ms, bucket=c.unique("hsm"), **FAST_HSM), "start": one(),
            "close": one()},
        "TieredCacheRepository": {
            "find": one(a), "find_entry": one(a), "peek": one(a), "peek_entry": one(a),
            "put": one(a, c.entity), "invalidate": one(a), "evict": one(a),
            "clear_l1": one(), "evict_expired": one(), "kv_key": one(a), "save": one(c.entity),
            "update": one(c.entity.replace(version=1)), "delete": one(a),
            "wait_for_revision": one(1, within=1.0), "seen_revision": one(), "calls": one(),
            "stats": one(), "samples": one(), "invalidation_latencies": one(),
            "open": one(ms, c.repo, bucket=c.unique("cache"), **FAST_CACHE), "start": one(),
            "close": one()},
        "Store": {
            "store": [((DataType.SESSION_DATA, "k", 1), {}),
                      ((DataType.TASK_INFO, c.task_id, {"n": 1}), {})],
            "retrieve": [((DataType.SESSION_DATA, "k"), {}),
                         ((DataType.TASK_INFO, c.task_id), {})],
            "remove": [((DataType.SESSION_DATA, "k"), {}), ((DataType.TASK_INFO, c.task_id), {})],
            "search": [((DataType.SESSION_DATA, "k"), {}), ((DataType.TASK_INFO, "pending"), {})],
            "storage": one(DataType.SESSION_DATA), "router": one(), "unavailable": one(),
            "open": one(ms, bucket_prefix=c.unique("st")), "close": one()},
        "KVStore": {
            "put": one("k", 1), "store": one("k", 1), "retrieve": one("k"),
            "remove": one("k"), "keys": one(), "search": one("k"),
            "open": one(ms, c.unique("kv"), ttl=60.0)},
        "SQLStore": {
            "store": one("k", 1), "retrieve": one("k"), "remove": one("k"),
            "search": one("x"), "for_data_type": one(ms, DataType.TASK_INFO)},
        "TaskStore": {
            "store": one(c.task_id, {"n": 1}), "store_many": one([(str(uuid.uuid4()), 2)]),
            "retrieve": one(c.task_id), "remove": one(c.task_id), "search": one("pending"),
            "purge_expired": one(), "for_data_type": one(ms, DataType.TASK_INFO)},
        "MessageLogStore": {
            "store": one("ch", 1), "append_many": one("ch", [1, 2]),
            "retrieve": one(str(uuid.uuid4())), "remove": one(str(uuid.uuid4())),
            "search": one("ch"), "for_data_type": one(ms, DataType.MESSAGE_LOG)},
        "VectorStore": {
            "store": one("doc", "some words"), "store_many": one({"d2": "more words"}),
            "retrieve": one("doc"), "remove": one("doc"), "search": one("words"),
            "hybrid_search": one("words"), "explain": one("words"), "embedders": one(),
            "embedder_name": one(), "indexed": one(),
            "open": one(ms, collection=c.unique("kb"))},
        "MemoryCache": {
            "get": one("k", None), "peek": one("k"), "set": one("k", 1), "delete": one("k"),
            "clear": one(),
            "purge_expired": one(), "store": one("k", 1), "retrieve": one("k"),
            "remove": one("k"), "search": one("k")},
    }
    return table[cls]


Bad = tuple[tuple[Any, ...], dict[str, Any], type[MsstoreError]]


def bad_calls(cls: str, c: Ctx) -> dict[str, list[Bad]]:
    """Malformed arguments per method name, with the error each must raise."""
    a, ms = c.agent, c.ms
    table: dict[str, dict[str, list[Bad]]] = {
        "StateLifecycleManager": {
            "write_state": [(("agent:1", "k", 1), {}, InvalidAgentIdError),
                            ((a, "", 1), {}, InvalidKeyError),
                            ((a, "k", object()), {}, NotSerializableError)],
            "remove_state": [((a, 7), {}, InvalidKeyError),
                             ((None, "k"), {}, InvalidAgentIdError)],
            "read_state": [(("x", "k"), {}, InvalidAgentIdError),
                           ((a, None), {}, InvalidKeyError)],
            "dirty": [((3,), {}, InvalidAgentIdError)],
            "state": [(("nope",), {}, InvalidAgentIdError)],
            "transitions": [(("bad",), {}, InvalidAgentIdError)],
            "transitions_frame": [((b"x",), {}, InvalidAgentIdError)],
            "on_transition": [((5,), {}, InvalidOptionError)],
            "hydrate_agent": [((42,), {}, InvalidAgentIdError)],
            "flush_agent": [(("nope",), {}, InvalidAgentIdError)],
            "checkpoint": [(("",), {}, InvalidAgentIdError)],
            "restore": [((a, "not-a-uuid"), {}, InvalidKeyError),
                        (("x", uuid.uuid4()), {}, InvalidAgentIdError)],
            "expire": [((None,), {}, InvalidAgentIdError)],
            "expire_idle": [(("soon",), {}, InvalidOptionError)],
            "open": [((ms,), {"ttl": -1}, InvalidOptionError),
                     ((ms,), {"hydrate_chunk": 0}, InvalidOptionError),
                     ((ms,), {"bucket": "bad.name"}, InvalidKeyError)],
            "start": [((), {"sweeper": True}, NotOpenError)],  # already started
        },
        "AgentRepository": {
            "save": [(("not an agent",), {}, InvalidValueError)],
            "find": [(("agent:1",), {}, InvalidAgentIdError)],
            "update": [((c.entity,), {"expected_version": 0}, InvalidValueError),
                       (("x",), {}, InvalidValueError)],
            "delete": [((42,), {}, InvalidAgentIdError)],
            "kv_key": [(("x",), {}, InvalidAgentIdError)],
            "open": [((ms,), {"batch_size": 0}, InvalidOptionError),
                     ((ms,), {"sql_timeout": -1}, InvalidOptionError),
                     ((ms,), {"bucket": "a.b"}, InvalidKeyError)],
        },
        "HybridStateManager": {
            "write_state": [(("x", "k", 1), {}, InvalidAgentIdError),
                            ((a, "k", object()), {}, NotSerializableError)],
            "read_state": [((a, ""), {}, InvalidKeyError)],
            "remove_state": [((a, 5), {}, InvalidKeyError)],
            "open": [((ms,), {"flush_threshold": 0}, InvalidOptionError),
                     ((ms,), {"flusher": "nope"}, InvalidOptionError),
                     ((ms,), {"sql_timeout": -1}, InvalidOptionError)],
        },
        "TieredCacheRepository": {
            "find": [(("",), {}, InvalidKeyError)],
            "find_entry": [((3,), {}, InvalidKeyError)],
            "peek": [((None,), {}, InvalidKeyError)],
            "peek_entry": [(("",), {}, InvalidKeyError)],
            "put": [(("", c.entity), {}, InvalidKeyError)],
            "invalidate": [(("",), {}, InvalidKeyError)],
            "evict": [(("",), {}, InvalidKeyError)],
            "kv_key": [(("",), {}, InvalidKeyError)],
            "save": [(("x",), {}, InvalidValueError)],
            "update": [(("x",), {}, InvalidValueError)],
            "delete": [(("agent:1",), {}, InvalidKeyError)],
            "wait_for_revision": [((-1,), {}, InvalidOptionError),
                                  ((1,), {"within": -1}, InvalidOptionError)],
            "open": [((ms, c.repo), {"l1_max_entries": 0}, InvalidOptionError),
                     ((ms, c.repo), {"kv_ttl": -1}, InvalidOptionError),
                     ((ms, c.repo), {"bucket": "a.b"}, InvalidKeyError)],
        },
        "Store": {
            "store": [(("nope", "k", 1), {}, RoutingError),
                      ((DataType.SESSION_DATA, "", 1), {}, InvalidKeyError),
                      ((DataType.SESSION_DATA, "k", object()), {}, NotSerializableError)],
            "retrieve": [((DataType.TASK_INFO, "not-a-uuid"), {}, InvalidKeyError)],
            "remove": [((5, "k"), {}, RoutingError)],
            "search": [((DataType.SESSION_DATA, "p"), {"limit": 0}, InvalidOptionError),
                       ((DataType.TASK_INFO, 5), {}, InvalidValueError)],
            "storage": [(("bogus",), {}, RoutingError)],
            "open": [((ms,), {"bucket_prefix": "bad.prefix"}, InvalidKeyError),
                     ((ms,), {"ttls": [1]}, InvalidOptionError),
                     ((ms,), {"ttls": {DataType.SESSION_DATA: -1}}, InvalidOptionError),
                     ((ms,), {"routes": {"x": "y"}}, RoutingError),
                     ((ms,), {"routes": {DataType.SESSION_DATA: "memory_cache"},
                              "memory_max_entries": 0}, InvalidOptionError),
                     ((ms,), {"embedder": "words"}, InvalidOptionError)],
        },
        "KVStore": {
            "put": [(("", 1), {}, InvalidKeyError), (("k", object()), {}, NotSerializableError)],
            "store": [((None, 1), {}, InvalidKeyError)],
            "retrieve": [(("",), {}, InvalidKeyError)],
            "remove": [((3,), {}, InvalidKeyError)],
            "search": [((5,), {}, InvalidValueError), (("a",), {"limit": -1}, InvalidOptionError)],
            "open": [((ms, "bad.name"), {}, InvalidKeyError),
                     ((ms, c.unique("kv")), {"ttl": -1}, InvalidOptionError),
                     ((ms, c.unique("kv")), {"max_value_bytes": 0}, InvalidOptionError)],
        },
        "SQLStore": {
            "store": [(("k", 1), {}, RoutingError)],
            "retrieve": [(("k",), {}, RoutingError)],
            "remove": [(("k",), {}, RoutingError)],
            "search": [(("x",), {}, RoutingError)],
            "for_data_type": [((ms, DataType.SESSION_DATA), {}, RoutingError),
                              ((ms, "bogus"), {}, RoutingError)],
        },
        "TaskStore": {
            "store": [(("not-a-uuid", {}), {}, InvalidKeyError),
                      ((c.task_id, {"status": 5}), {}, InvalidValueError),
                      ((c.task_id, 1), {"ttl": -1}, InvalidValueError)],
            "store_many": [((5,), {}, InvalidValueError), (([(1,)],), {}, InvalidValueError),
                           (("ab",), {}, InvalidValueError)],
            "retrieve": [(("x",), {}, InvalidKeyError)],
            "remove": [((None,), {}, InvalidKeyError)],
            "search": [((5,), {}, InvalidValueError),
                       (("pending",), {"limit": 0}, InvalidOptionError)],
            "for_data_type": [((ms, DataType.KNOWLEDGE_BASE), {}, RoutingError)],
        },
        "MessageLogStore": {
            "store": [(("", 1), {}, InvalidKeyError),
                      (("ch", 1), {"agent_id": "x"}, InvalidAgentIdError)],
            "append_many": [(("ch", "abc"), {}, InvalidValueError),
                            ((None, [1]), {}, InvalidKeyError)],
            "retrieve": [(("x",), {}, InvalidKeyError)],
            "remove": [(("",), {}, InvalidKeyError)],
            "search": [((5,), {}, InvalidValueError),
                       (("ch",), {"limit": "3"}, InvalidOptionError)],
            "for_data_type": [((ms, DataType.AGENT_STATE), {}, RoutingError)],
        },
        "VectorStore": {
            "store": [(("", "words"), {}, InvalidKeyError), (("k", 42), {}, InvalidValueError)],
            "store_many": [((7,), {}, InvalidValueError)],
            "retrieve": [(("",), {}, InvalidKeyError)],
            "remove": [((5,), {}, InvalidKeyError)],
            "search": [((5,), {}, InvalidValueError),
                       (("q",), {"limit": 0}, InvalidOptionError),
                       (("words",), {"where": [1]}, InvalidValueError),
                       (("words",), {"exact": "yes"}, InvalidOptionError)],
            "hybrid_search": [((5,), {}, InvalidValueError),
                              (("q",), {"candidates": 0}, InvalidOptionError),
                              (("q",), {"k": -1}, InvalidOptionError),
                              (("words",), {"where": "x"}, InvalidValueError)],
            "explain": [((5,), {}, InvalidValueError),
                        (("words",), {"where": [1]}, InvalidValueError)],
            "open": [((ms,), {"collection": ""}, InvalidKeyError),
                     ((ms,), {"ef_search": 0}, InvalidOptionError),
                     ((ms,), {"embedder": "x"}, InvalidOptionError),
                     ((ms,), {"offload_embedding": "yes"}, InvalidOptionError)],
        },
        "MemoryCache": {
            "get": [(("",), {}, InvalidKeyError)],
            "peek": [((None,), {}, InvalidKeyError)],
            "set": [((None, 1), {}, InvalidKeyError), (("k", 1), {"ttl": -1}, InvalidValueError)],
            "delete": [((3,), {}, InvalidKeyError)],
            "store": [(("", 1), {}, InvalidKeyError)],
            "retrieve": [((None,), {}, InvalidKeyError)],
            "remove": [(("",), {}, InvalidKeyError)],
            "search": [((1,), {}, InvalidValueError), (("",), {"limit": 0}, InvalidOptionError)],
        },
    }
    return table[cls]


def bad_constructors(c: Ctx) -> dict[str, list[tuple[Callable[[], object],
                                                      type[MsstoreError]]]]:
    """Constructors with a bad option each (they run no I/O)."""
    ms = c.ms
    return {
        "StateLifecycleManager": [(lambda: StateLifecycleManager(ms, ttl=0),
                                   InvalidOptionError),
                                  (lambda: StateLifecycleManager(ms, nats_timeout="1"),
                                   InvalidOptionError)],
        "AgentRepository": [(lambda: AgentRepository(ms, max_pending=True), InvalidOptionError),
                            (lambda: AgentRepository(ms, max_retries=-1), InvalidOptionError)],
        "HybridStateManager": [(lambda: HybridStateManager(ms, batch_size=-1),
                                InvalidOptionError),
                               (lambda: HybridStateManager(ms, close_timeout=0),
                                InvalidOptionError)],
        "TieredCacheRepository": [(lambda: TieredCacheRepository(ms, c.repo,  # type: ignore[arg-type]
                                                                 l1_ttl=-1),
                                   InvalidOptionError)],
        "Store": [(lambda: Store(None, {}), RoutingError),  # type: ignore[arg-type]
                  (lambda: Store(msstore.DataRouter(), []), RoutingError)],  # type: ignore[arg-type]
        "KVStore": [(lambda: KVStore(None, bucket="b", ttl=None),  # type: ignore[arg-type]
                     InvalidOptionError)],
        "SQLStore": [(lambda: SQLStore("pool"), InvalidOptionError)],  # type: ignore[arg-type]
        "TaskStore": [(lambda: TaskStore(ms.pool, max_value_bytes=0), InvalidOptionError)],
        "MessageLogStore": [(lambda: MessageLogStore(ms.pool, max_value_bytes=-1),
                             InvalidOptionError)],
        "VectorStore": [(lambda: VectorStore(ms.pool, offload_embedding="yes"),  # type: ignore[arg-type]
                         InvalidOptionError),
                        (lambda: VectorStore(ms.pool, collection=""), InvalidKeyError)],
        "MemoryCache": [(lambda: MemoryCache(max_entries=0), InvalidOptionError),
                        (lambda: MemoryCache(ttl=-1), InvalidOptionError)],
    }


# --------------------------------------------------------------------------- the subjects


def make(cls: str, c: Ctx) -> Any:
    """An unopened instance (for layers: a ready one; they have no open state)."""
    ms = c.ms
    if cls == "StateLifecycleManager":
        return StateLifecycleManager(ms, bucket=c.unique("lm"), **FAST_LM)
    if cls == "AgentRepository":
        return AgentRepository(ms, bucket=c.unique("repo"), **FAST_REPO)
    if cls == "HybridStateManager":
        return HybridStateManager(ms, bucket=c.unique("hsm"), **FAST_HSM)
    if cls == "TieredCacheRepository":
        assert c.repo is not None
        return TieredCacheRepository(ms, c.repo, bucket=c.unique("cache"), **FAST_CACHE)
    if cls == "SQLStore":
        return SQLStore(ms.pool)
    if cls == "TaskStore":
        return TaskStore(ms.pool)
    if cls == "MessageLogStore":
        return MessageLogStore(ms.pool)
    if cls == "VectorStore":
        return VectorStore(ms.pool, collection=c.unique("kb"))
    if cls == "MemoryCache":
        return MemoryCache()
    raise AssertionError(f"{cls} needs I/O to build: use opened()")


async def opened(cls: str, c: Ctx) -> Any:
    """A ready instance: started managers, opened stores."""
    async with asyncio.timeout(60):
        if cls == "Store":
            return await Store.open(c.ms, bucket_prefix=c.unique("st"))
        if cls == "KVStore":
            return await KVStore.open(c.ms, c.unique("kv"), ttl=60.0)
        obj = make(cls, c)
        if cls in MANAGERS:
            await obj.start()
        return obj


# --------------------------------------------------------------------------- running calls


@dataclass
class Outcome:
    id: str
    value: Any = None
    error: BaseException | None = None
    hung: bool = False

    def describe(self) -> str:
        if self.hung:
            return f"{self.id}: hung (no answer within {CALL_TIMEOUT} s)"
        if self.error is not None:
            return f"{self.id}: {type(self.error).__module__}.{type(self.error).__name__}: " \
                   f"{self.error}"[:300]
        return f"{self.id}: returned {self.value!r:.80}"


async def run(call_id: str, fn: Callable[[], Any]) -> Outcome:
    """Call ``fn`` (awaiting its result) within CALL_TIMEOUT; never raises (but cancellation)."""
    cm = asyncio.timeout(CALL_TIMEOUT)
    try:
        async with cm:
            value = fn()
            if inspect.isawaitable(value):
                value = await value
    except asyncio.CancelledError:
        raise
    except BaseException as e:  # classifying every exception is the point
        if cm.expired():
            return Outcome(call_id, hung=True)
        return Outcome(call_id, error=e)
    await close_if_opened(value)
    return Outcome(call_id, value=value)


async def close_if_opened(value: Any) -> None:
    """``open()`` succeeded: close what it opened, so no task is left behind."""
    if isinstance(value, StateLifecycleManager | AgentRepository | HybridStateManager
                  | TieredCacheRepository | Store):
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CALL_TIMEOUT):
                await value.close()


def bound(obj: Any, cls: str, name: str, args: tuple[Any, ...],
          kwargs: dict[str, Any]) -> Callable[[], Any]:
    attr = inspect.getattr_static(CLASSES[cls], name)
    if isinstance(attr, property):
        return lambda: getattr(obj, name)
    target = CLASSES[cls] if isinstance(attr, classmethod | staticmethod) else obj
    return lambda: getattr(target, name)(*args, **kwargs)


async def call_everything(situation: str, objects: dict[str, Any], c: Ctx,
                          skip: frozenset[str] = frozenset()) -> list[Outcome]:
    """Every public method and property of every object, with the good arguments."""
    outcomes = []
    for cls, obj in objects.items():
        table = good_calls(cls, c)
        for name in public_api(CLASSES[cls]):
            if name in skip:
                continue
            for i, (args, kwargs) in enumerate(table[name]):
                variant = f"[{i}]" if len(table[name]) > 1 else ""
                outcomes.append(await run(f"{situation}:{cls}.{name}{variant}",
                                          bound(obj, cls, name, args, kwargs)))
    return outcomes


def check(outcomes: list[Outcome], expect: Callable[[Outcome], type[BaseException] | None]
          ) -> None:
    """Each outcome typed (and of the expected class where one is given).

    ``expect(o)`` names the class the call must raise, or None: "may succeed, and if it
    raises, an MsstoreError". A hang always fails.
    """
    failures = []
    for o in outcomes:
        wanted = expect(o)
        if o.hung:
            ok = False
        elif o.error is None:
            ok = wanted is None
        else:
            ok = isinstance(o.error, wanted or MsstoreError)
        if not ok:
            failures.append(o.describe() + (f"  (expected {wanted.__name__})" if wanted else ""))
    assert not failures, "untyped or unexpected outcomes:\n" + "\n".join(failures)


def name_of(o: Outcome) -> tuple[str, str]:
    """("Class", "method") of an outcome id like ``pg-down:Store.store[1]``."""
    cls, _, method = o.id.split(":", 1)[1].partition(".")
    return cls, method.split("[")[0]


# --------------------------------------------------------------------------- the tests


async def test_the_tables_cover_every_public_method(ms: msstore.Connection,
                                                    unique: Callable[[str], str]) -> None:
    c = Ctx(ms, unique, repo=AgentRepository(ms))
    ctors = bad_constructors(c)
    for cls_name, cls in CLASSES.items():
        api = set(public_api(cls))
        assert api, cls_name
        assert set(good_calls(cls_name, c)) == api, (
            f"{cls_name}: give arguments for {sorted(api - set(good_calls(cls_name, c)))}, "
            f"drop {sorted(set(good_calls(cls_name, c)) - api)}")
        needs_bad = {n for n in api if takes_arguments(cls, n)} - {"start", "close"}
        missing = needs_bad - set(bad_calls(cls_name, c))
        assert not missing, f"{cls_name}: add bad arguments for {sorted(missing)}"
        assert ctors[cls_name], cls_name
    # the introspection sees what the classes really offer
    assert {"write_state", "read_state", "checkpoint", "restore", "open"} <= set(
        public_api(StateLifecycleManager))
    # one set of key-level verbs across the managers
    verbs = {"write_state", "read_state", "remove_state"}
    assert verbs <= set(public_api(HybridStateManager))
    assert not {"write", "read", "delete"} & set(public_api(StateLifecycleManager))
    for verb in verbs:
        assert (inspect.signature(getattr(StateLifecycleManager, verb)).parameters.keys()
                == inspect.signature(getattr(HybridStateManager, verb)).parameters.keys())
    assert "pending" in public_api(AgentRepository)  # a property


async def test_bad_options_and_arguments_raise_the_specific_error(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    repo = await AgentRepository.open(ms, bucket=unique("repo"), **FAST_REPO)
    c = Ctx(ms, unique, repo=repo)
    outcomes: list[Outcome] = []
    expected: dict[str, type[MsstoreError]] = {}
    objects = {cls: await opened(cls, c) for cls in CLASSES}
    try:
        for cls, cases in bad_constructors(c).items():
            for i, (ctor, error) in enumerate(cases):
                call_id = f"bad:{cls}.__init__[{i}]"
                expected[call_id] = error
                outcomes.append(await run(call_id, ctor))
        for cls, obj in objects.items():
            for name, cases in bad_calls(cls, c).items():
                for i, (args, kwargs, error) in enumerate(cases):
                    call_id = f"bad:{cls}.{name}[{i}]"
                    expected[call_id] = error
                    outcomes.append(await run(call_id, bound(obj, cls, name, args, kwargs)))
    finally:
        for obj in objects.values():
            await close_if_opened(obj)
        await repo.close()
    assert len(outcomes) >= 140
    check(outcomes, lambda o: expected[o.id])


async def test_before_open_and_after_close_raise_not_open(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    repo = await AgentRepository.open(ms, bucket=unique("repo"), **FAST_REPO)
    c = Ctx(ms, unique, repo=repo)
    try:
        before = {cls: make(cls, c) for cls in MANAGERS if cls != "Store"}
        outcomes = await call_everything("before", before, c, skip=frozenset({"open", "start"}))
        after = {cls: await opened(cls, c) for cls in MANAGERS}
        for obj in after.values():
            await obj.close()
        outcomes += await call_everything("after", after, c, skip=frozenset({"open"}))
    finally:
        await repo.close()

    def expect(o: Outcome) -> type[BaseException] | None:
        cls, method = name_of(o)
        return None if method in IN_MEMORY[cls] else NotOpenError

    assert len(outcomes) >= 80
    check(outcomes, expect)


async def test_a_closed_connection_is_typed(database_url: str,
                                            endpoints: services.Endpoints,
                                            unique: Callable[[str], str]) -> None:
    conn = await msstore.connect(database_url, endpoints.nats_url, connect_timeout=5)
    c = Ctx(conn, unique)
    try:
        c.repo = await AgentRepository.open(conn, bucket=unique("repo"), **FAST_REPO)
        objects = {cls: await opened(cls, c) for cls in CLASSES}
    finally:
        await conn.close()
    outcomes = await call_everything("closed", objects, c)

    def expect(o: Outcome) -> type[BaseException] | None:
        cls, method = name_of(o)
        if cls == "SQLStore" and method != "for_data_type":
            return RoutingError
        if method == "start":
            return NotOpenError  # started already
        if cls in ("TaskStore", "MessageLogStore", "VectorStore", "KVStore") and method not in (
                "for_data_type", "embedder_name", "indexed"):  # those two are in memory
            return StoreUnavailableError
        return None

    check(outcomes, expect)


#: (class, method) pairs that must reach PostgreSQL, so raise StoreUnavailableError when down.
NEEDS_PG = {("TaskStore", m) for m in ("store", "store_many", "retrieve", "remove", "search",
                                       "purge_expired")} | \
    {("MessageLogStore", m) for m in ("store", "append_many", "retrieve", "remove", "search")} | \
    {("VectorStore", m) for m in ("open", "store", "store_many", "retrieve", "remove",
                                  "search", "hybrid_search", "explain", "embedders")} | \
    {("StateLifecycleManager", m) for m in ("write_state", "read_state", "remove_state",
                                            "hydrate_agent", "checkpoint", "restore")} | \
    {("AgentRepository", "find"), ("Store", "open")}
#: Store calls whose variant [1] is routed to PostgreSQL (TASK_INFO).
NEEDS_PG_VARIANT = {f"Store.{m}[1]" for m in ("store", "retrieve", "remove", "search")}


async def test_postgres_down_is_typed(private_pg: Path, ms: msstore.Connection,
                                      unique: Callable[[str], str]) -> None:
    endpoints = await asyncio.to_thread(services.up, private_pg, which=("postgres",))
    conn = await msstore.connect(endpoints.database_url, ms.nats_url, connect_timeout=5,
                                 migration_url=endpoints.migration_url)
    c = Ctx(conn, unique)
    try:
        c.repo = await AgentRepository.open(conn, bucket=unique("repo"), **FAST_REPO)
        objects = {cls: await opened(cls, c) for cls in CLASSES}
        await asyncio.to_thread(services.down, private_pg, which=("postgres",))
        try:
            outcomes = await call_everything("pg-down", objects, c)
            # the repository's queued SQL writes cannot land: drain says so, typed
            outcomes.append(await run("pg-down:AgentRepository.drain[pending]", c.repo.drain))
        finally:
            await asyncio.to_thread(services.up, private_pg, which=("postgres",))
        with contextlib.suppress(MsstoreError):
            await c.repo.close()
    finally:
        await conn.close()

    def expect(o: Outcome) -> type[BaseException] | None:
        cls, method = name_of(o)
        if cls == "SQLStore" and method != "for_data_type":
            return RoutingError
        if method == "start":
            return NotOpenError
        if (cls, method) in NEEDS_PG or o.id.split(":", 1)[1] in NEEDS_PG_VARIANT \
                or o.id == "pg-down:AgentRepository.drain[pending]":
            return StoreUnavailableError
        return None

    check(outcomes, expect)
    # the lifecycle calls failed because PostgreSQL is down, not for another reason
    by_id = {o.id: o for o in outcomes}
    write_error = by_id["pg-down:StateLifecycleManager.write_state"].error
    assert "PostgreSQL is unavailable" in str(write_error)


#: (class, method) pairs that must reach NATS, so raise StoreUnavailableError when it is down.
NEEDS_NATS = {("KVStore", m) for m in ("open", "put", "store", "retrieve", "remove", "keys",
                                       "search")} | \
    {("AgentRepository", m) for m in ("save", "find", "update", "delete", "open")} | \
    {("StateLifecycleManager", m) for m in ("write_state", "read_state", "remove_state",
                                            "open")} | \
    {("HybridStateManager", m) for m in ("write_state", "read_state", "remove_state", "open")} | \
    {("Store", "open")}
NEEDS_NATS_VARIANT = {f"Store.{m}[0]" for m in ("store", "retrieve", "remove", "search")}


async def test_nats_down_is_typed(private_nats: Path, database_url: str,
                                  unique: Callable[[str], str]) -> None:
    await asyncio.to_thread(services.up, private_nats, which=("nats",))
    conn = await msstore.connect(database_url, private_nats_url(private_nats),
                                 connect_timeout=3)
    # JetStream requests give up after 0.5 s instead of 5 s, so the table runs in seconds
    conn = dataclasses.replace(conn, js=conn.nc.jetstream(timeout=0.5))
    c = Ctx(conn, unique)
    try:
        c.repo = await AgentRepository.open(conn, bucket=unique("repo"), **FAST_REPO)
        objects = {cls: await opened(cls, c) for cls in CLASSES}
        kill9(private_nats, "nats")
        try:
            outcomes = await call_everything("nats-down", objects, c)
        finally:
            await asyncio.to_thread(services.up, private_nats, which=("nats",))
        with contextlib.suppress(MsstoreError):
            await c.repo.close()
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await conn.close()

    def expect(o: Outcome) -> type[BaseException] | None:
        cls, method = name_of(o)
        if cls == "SQLStore" and method != "for_data_type":
            return RoutingError
        if method == "start":
            return NotOpenError
        if (cls, method) in NEEDS_NATS or o.id.split(":", 1)[1] in NEEDS_NATS_VARIANT:
            return StoreUnavailableError
        return None

    check(outcomes, expect)


# --------------------------------------------------------------------------- read-through race


class RacingLifecycle(StateLifecycleManager):
    """Writes (or deletes) the key between the read-through's SQL read and its KV create."""

    action: Callable[[StateLifecycleManager, uuid.UUID, str], Awaitable[Any]] | None = None

    async def _after_sql_read(self, agent: uuid.UUID, key: str) -> None:
        if self.action is not None:
            action, self.action = self.action, None
            await action(self, agent, key)


async def drop_from_kv(ms: msstore.Connection, lm: StateLifecycleManager, agent: uuid.UUID,
                       key: str) -> None:
    """Remove every KV message of ``key`` (as the bucket's max age would): SQL still has it."""
    kv_key = join_key(str(agent), key)
    await ms.js.purge_stream(lm.stream, subject=f"{lm.subject_prefix}{kv_key}")


@pytest.mark.parametrize("racer", ["write", "delete"])
async def test_lifecycle_read_through_rereads_kv_after_losing_the_race(
        ms: msstore.Connection, unique: Callable[[str], str], racer: str) -> None:
    agent = uuid.uuid4()
    async with RacingLifecycle(ms, bucket=unique("race"), **FAST_LM) as lm:
        await lm.write_state(agent, "k", "old")
        await lm.flush_agent(agent)
        await drop_from_kv(ms, lm, agent, "k")
        if racer == "write":
            lm.action = lambda m, a, k: m.write_state(a, k, "new")
        else:
            lm.action = lambda m, a, k: m.remove_state(a, k)
        got = await lm.read_state(agent, "k", "gone")
        assert lm.action is None  # the race happened
        assert lm.counters["hydration_conflicts"] == 1
        kv = await ms.js.key_value(lm.bucket)
        kv_key = join_key(str(agent), "k")
        if racer == "write":
            assert got == "new"  # not the stale SQL row "old"
            assert loads((await kv.get(kv_key)).value) == "new"
        else:
            assert got == "gone"  # the delete wins over the SQL row
            with pytest.raises(NotFoundError):
                await lm.read_state(agent, "k")
        await lm.flush_agent(agent)
        row = await ms.pool.fetchval(
            "SELECT value FROM agents.state WHERE agent_id = $1 AND key = 'k'", agent)
        assert row == ("new" if racer == "write" else None)


async def test_lifecycle_read_through_without_a_race_recreates_the_key(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    agent = uuid.uuid4()
    async with RacingLifecycle(ms, bucket=unique("race"), **FAST_LM) as lm:
        await lm.write_state(agent, "k", {"v": 1})
        await lm.flush_agent(agent)
        await drop_from_kv(ms, lm, agent, "k")
        assert await lm.read_state(agent, "k") == {"v": 1}
        assert (lm.counters["hydration_conflicts"], lm.counters["hydrations"]) == (0, 1)
        kv = await ms.js.key_value(lm.bucket)
        entry = await kv.get(join_key(str(agent), "k"))
        assert loads(entry.value) == {"v": 1}


# --------------------------------------------------------------------------- the policy, live


async def test_the_policy_on_a_real_server(ms: msstore.Connection) -> None:
    """A SQL bug is a StoreError, a refused value a DataRejectedError, a timeout a timeout."""
    from msstore._pg import pg_call, retryable
    from msstore.errors import DataRejectedError, StoreError, StoreTimeoutError

    with pytest.raises(StoreError, match="42P01") as bug:
        await pg_call("read", ms.pool.fetch("SELECT * FROM agents.no_such_table"))
    assert not isinstance(bug.value, StoreUnavailableError) and not retryable(bug.value)
    with pytest.raises(DataRejectedError, match="22P02") as data:
        await pg_call("read", ms.pool.fetchval("SELECT 'seven'::int"))
    assert not retryable(data.value)
    async with ms.pool.acquire() as conn:
        await conn.execute("SET statement_timeout = '50ms'")
        try:
            with pytest.raises(StoreTimeoutError, match="may still have been applied") as slow:
                await pg_call("sleep", conn.execute("SELECT pg_sleep(5)"))
        finally:
            await conn.execute("RESET statement_timeout")
    assert retryable(slow.value)
