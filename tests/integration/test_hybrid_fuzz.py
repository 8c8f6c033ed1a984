"""A hypothesis state machine over ``HybridStateManager``: awkward agent ids, keys and values.

The acceptance criterion: every call either round-trips exactly through KV, PostgreSQL and
hydration, or raises an :class:`msstore.MsstoreError` (and then changes nothing); a flush after
the fuzz succeeds and PostgreSQL refused nothing msstore accepted (``foreign_messages == 0``).

Each test opens one manager (its own bucket, a small flush threshold, so background flushes
run while the fuzz goes on) and runs the machine in a worker thread; every call is sent to the
session's event loop (as in ``test_value_roundtrip.py``). One example is one sequence of
write_state / remove_state / read_state / evict (the KV message disappears, as after its TTL)
/ flush on a model: (agent UUID, key) -> what the key must hold. Agents are fresh per example
(three per run, used in every str form), so examples never see each other's rows.

What each key must hold comes from ``normalise`` (tests/unit/test_value_mapping.py, written
from the mapping in ``msstore.codec``'s docstring), which keys and agent ids are refused from
the oracles below (written from ``msstore.keys``'s docstring and ``uuid.UUID``). After every
flush, for every key of the model:

(a) ``read_state`` is a KV hit and equals the model (strictly: types, and the sign of zero);
(b) the ``agents.state`` row holds the model's value and ``version`` is the last acknowledged
    revision; a removed key has no row, and its tombstone has the delete's revision; the
    agents have no other rows;
(c) with the KV message and its durability-log copy purged (no delete marker), ``read_state``
    hydrates from PostgreSQL: equal to the model as JSONB gives it back (-0.0 as 0.0), and the
    value re-installed in KV is exactly the codec's encoding of that (so it fits).

Two bugs the fuzz found are kept as regression tests at the end, both fixed: values whose
tuples hid levels from orjson's depth limit were accepted and then could not be hydrated from
PostgreSQL (now refused: ``test_tuples_hiding_levels_from_the_depth_limit``); a hydration
stalled the durability log on NATS < 2.10.14 (there a hydrated value is now served without
being cached in a logged bucket: ``test_a_hydration_from_the_log_does_not_stall_it``).

Deep and huge values are generated as small specs (``Deep``, ``Big``) and built inside the
rule: hypothesis cannot print a 5,000-level value, and a 1 MiB repr would swamp a report.
Tuples are nested up to 5,000 deep too (orjson 3.12/3.13 corrupted the heap there; msstore
requires orjson < 3.12).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from decimal import Decimal
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

import msstore
from msstore import (
    InvalidAgentIdError,
    InvalidKeyError,
    InvalidValueError,
    MsstoreError,
    NotFoundError,
    ValueTooLargeError,
    _durable,
    _nats,
)
from msstore.codec import MAX_VALUE_BYTES, dumps
from msstore.hybrid import HybridStateManager
from msstore.keys import MAX_ENCODED_KEY, join_key
from tests.integration.test_value_roundtrip import jsonb_order
from tests.unit.test_value_mapping import Colour, Record, normalise, same, values

T = TypeVar("T")
FULL = os.environ.get("MSSTORE_SCALE") == "full"
MAX_EXAMPLES = 300 if FULL else 40
STEPS = 60 if FULL else 30
SETTINGS = settings(
    max_examples=MAX_EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example])

# --------------------------------------------------------------------------- oracles: ids, keys

# The str forms uuid.UUID(s) reads, the stdlib's quirks included (int(s, 16) takes a sign,
# whitespace, "_" between digits and any Unicode decimal digit): agents start with 00 so that
# every form exists.
UUID_FORMS = ("uuid", "str", "upper", "hex", "urn", "uuid:", "braces", "left-brace", "0x",
              "plus", "space", "underscore", "arabic-digits")
_ARABIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")


def fresh_agent() -> uuid.UUID:
    return uuid.UUID(bytes=b"\x00" + os.urandom(15), version=4)


@dataclasses.dataclass(frozen=True)
class AgentRef:
    """One of the example's fresh agents (``index``), passed in one of its forms."""

    index: int
    form: str


def agent_form(agent: uuid.UUID, form: str) -> uuid.UUID | str:
    h = agent.hex
    assert h[:2] == "00"
    return {"uuid": agent, "str": str(agent), "upper": str(agent).upper(), "hex": h,
            "urn": agent.urn, "uuid:": f"uuid:{agent}", "braces": "{" + str(agent) + "}",
            "left-brace": "{" + h, "0x": "0x" + h[2:], "plus": "+" + h[1:],
            "space": " " + h[1:], "underscore": "0_" + h[2:],
            "arabic-digits": h.translate(_ARABIC)}[form]


def expected_agent(agent_id: object) -> uuid.UUID | None:
    """The agent an id names, or None if msstore must refuse it (UUIDs and their str forms,
    as ``uuid.UUID(s)`` reads them; nothing else)."""
    if type(agent_id) is uuid.UUID:
        return agent_id
    if isinstance(agent_id, str):
        try:
            return uuid.UUID(agent_id)
        except ValueError:
            return None
    return None


_SAFE = frozenset("-/_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_AGENT_TOKEN = 36 + 1  # "<uuid>." in front of every key


def key_verdict(key: object) -> bool | None:
    """True: the key must be accepted; False: refused (InvalidKeyError); None: either (the
    joined KV key is within a few characters of the limit, depending on how dots encode)."""
    if not isinstance(key, str) or not key or "\x00" in key or len(key) > MAX_ENCODED_KEY:
        return False
    if any(0xD800 <= ord(c) <= 0xDFFF for c in key):
        return False
    lo = hi = 2 if key[:3].lower() == "_kv" else 0  # its "_" becomes "=5F"
    for ch in key:
        if ch in _SAFE:
            lo, hi = lo + 1, hi + 1
        elif ch == ".":
            lo, hi = lo + 1, hi + 3  # a dot stays a dot unless it would make an empty token
        else:
            n = 3 * len(ch.encode("utf-8"))  # "=XX" per UTF-8 byte
            lo, hi = lo + n, hi + n
    if hi + _AGENT_TOKEN <= MAX_ENCODED_KEY:
        return True
    if lo + _AGENT_TOKEN > MAX_ENCODED_KEY:
        return False
    return None


def weighted(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any],
             ratio: int = 2) -> st.SearchStrategy[Any]:
    """``common`` ``ratio`` times as often as ``rare`` (shrinking towards ``common``)."""
    return st.integers(0, ratio).flatmap(lambda i: rare if i == ratio else common)


# --------------------------------------------------------------------------- value specs


@dataclasses.dataclass(frozen=True)
class Deep:
    """``leaf`` nested ``depth`` levels deep in lists, dicts, tuples (<= 1,500) or a mix."""

    depth: int
    kind: str
    leaf: Any = 1

    def build(self) -> Any:
        v: Any = self.leaf
        for i in range(self.depth):
            kind = self.kind if self.kind != "mixed" else ("list", "dict", "tuple")[i % 3]
            v = [v] if kind == "list" else {"k": v} if kind == "dict" else (v,)
        return v


@dataclasses.dataclass(frozen=True)
class Big:
    """A str of ``n`` characters ``char`` (wrapped in a list or not): near the size limit."""

    n: int
    char: str
    wrapped: bool

    def build(self) -> Any:
        text = self.char * self.n
        return [text] if self.wrapped else text

    def size(self) -> int:
        return self.n * len(self.char.encode()) + 2 + (2 if self.wrapped else 0)


AWKWARD_VALUES: list[Any] = [
    math.nan, math.inf, -math.inf, [1.0, math.nan], {"x": {"y": -math.inf}}, {math.nan: 1},
    2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**40, [-(10**30)],
    b"bytes", bytearray(b"x"), memoryview(b"m"), {1, 2}, frozenset(), Decimal("1.10"),
    [Decimal("NaN")], dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC), dt.datetime(2026, 1, 1),
    dt.date(1, 1, 1), dt.time(0, 0, 0, 10_000), {dt.time(0, 0, 0, 12_345): 1},
    "\ud800", "x\udfffy", {"k": "\udbff"}, {"\ud800": 1}, "\x00", "a\x00b", {"\x00": 1},
    ["\\u0000", "\\\x00"], "\\u0000", {1: "a", "1": "b"}, {"x": [{True: 1, "true": 2}]},
    {None: 1, "null": 2}, {1.5: 0, "1.5": 1}, {1e16: 0, "1e+16": 1}, {uuid.UUID(int=1): 1,
                                                                       str(uuid.UUID(int=1)): 2},
    -0.0, [-0.0, {"z": -0.0}], 1e16, -1e16, 1.2345678901234567e18, sys.float_info.max, 5e-324,
    1e-7, 0.1, "", {}, [], None, True, "🎉\u2028日本語", {"": ""}, uuid.UUID(int=1),
    Colour.BIG, Colour.PAIR, Record(1e16, [Colour.PAIR, (-0.0,)]), (1, (2, (3,))),
    {"b": 1, "aa": 2, "a": 3, "é": 4, "ab": 5}, {(1, 2): "tuple key"}, object(),
    [[] for _ in range(3)],
]

value_specs = st.one_of(
    values,
    st.sampled_from(AWKWARD_VALUES),
    st.builds(Deep, st.one_of(st.sampled_from([5_000, 1_000, 256, 255, 254, 253]),
                              st.integers(1, 300)),
              st.sampled_from(["list", "dict"]),
              st.sampled_from([1, -0.0, 1e16, "x", None, math.nan, {1: 2}])),
    # tuples among the levels (a third of them), or only tuples: they count as levels, as the
    # JSON arrays they become (test_tuples_hiding_levels_from_the_depth_limit below)
    st.builds(Deep, st.one_of(st.sampled_from([5_000, 1_300, 256, 255, 254, 253]),
                                    st.integers(1, 300)),
              st.just("mixed"), st.sampled_from([1, -0.0, 1e16, "x", None])),
    st.builds(Deep, st.one_of(st.sampled_from([5_000, 1_500, 256, 255, 254]), st.integers(1, 300)),
              st.just("tuple"), st.sampled_from([1, -0.0, 1e16, "\x00"])),
    st.builds(Big, st.one_of(st.integers(MAX_VALUE_BYTES - 6, MAX_VALUE_BYTES + 2),
                             st.sampled_from([1, 1_000, 100_000])),
              st.just("x"), st.booleans()),
    st.builds(Big, st.sampled_from([MAX_VALUE_BYTES // 2 - 2, MAX_VALUE_BYTES // 2 - 1,
                                    MAX_VALUE_BYTES // 2]), st.just("é"), st.just(False)),
)


# Storable values, so that most writes land: JSON-shaped, awkward only where it is allowed.
_storable_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=10)
_storable = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), _storable_text,
              st.floats(allow_nan=False, allow_infinity=False),
              st.sampled_from([1e16, -0.0, 5e-324, 1.2345678901234567e18, 2**64 - 1, "é🎉",
                               "\\u0000", "null", "e+16"])),
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(_storable_text, kids, max_size=4)),
    max_leaves=16)
value_specs = weighted(_storable, value_specs)


def build(spec: Any) -> tuple[Any, int | None]:
    """The value of a spec, and the size it must encode to when that is known."""
    if isinstance(spec, Deep):
        return spec.build(), None
    if isinstance(spec, Big):
        return spec.build(), spec.size()
    return spec, None


# --------------------------------------------------------------------------- keys and agents

_chars = st.characters(codec=None, categories=None)  # every code point, surrogates too
AWKWARD_KEYS = [
    "", "\x00", "a\x00", ".", "..", "a.", ".a", "a..b", "a.b.c", "*", ">", "a.*", "a.>", "*.>",
    "_kv", "_KV.x", "_kvx", "x._kv", "=", "=2E", "=3D41", "agent:42/é.*", "🎉", "\ud800",
    "x\udfffy", "日本語", "a b", " ", "\n", "\t.\r", "key.with.dots", "$KV", "-", "/", "plan",
]
VALID_KEYS = ["plan", "a.b", "a.b.c", "a..b", ".", "..", ".a", "a.", "*", ">", "a.*", "a.>",
              "_kv", "_KV.x", "=", "=2E", "agent:42/é.*", "🎉", "日本語", " ", "\n", "$KV",
              "-", "/", "k" * 980, "." * 300, "é" * 164]
key_strategy = st.one_of(
    st.sampled_from(AWKWARD_KEYS),
    st.text(_chars, min_size=0, max_size=12),
    st.text(st.sampled_from("a.*>=_é\x00"), min_size=1, max_size=8),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", ".", "a.", "é", "🎉", "="]),
              st.sampled_from([10_000, 1_025, 1_024, 987, 986, 330, 329, 246, 247])),
    st.integers(), st.none(), st.binary(max_size=4), st.floats(), st.tuples(st.text(max_size=2)),
    st.uuids(),
)
_valid_agent = st.builds(AgentRef, st.integers(0, 2), st.sampled_from(UUID_FORMS))
agent_strategy = weighted(_valid_agent, st.one_of(
    st.sampled_from(["", "not-a-uuid", "\x00", "\ud800", "g" * 32, "0" * 31, "0" * 33,
                     str(uuid.UUID(int=0)) + "\x00", "12345678-1234-5678-1234-56781234567Z"]),
    st.text(_chars, max_size=40),
    st.integers(), st.none(), st.binary(max_size=16), st.floats(),
    st.uuids().map(lambda u: u.bytes),
), ratio=4)

# --------------------------------------------------------------------------- the machine

DELETED = object()


@dataclasses.dataclass
class Entry:
    """What one key must hold: ``written`` as last written (normalised), ``stored`` as the
    newest KV message holds it (the written form, or JSONB's after a hydration from SQL)."""

    written: Any  # DELETED after a remove
    stored: Any
    revision: int  # of the last acknowledged write or remove


class HybridFuzz(RuleBasedStateMachine):
    """The model-based fuzz; ``bind`` sets the manager and the loop before a run."""

    hsm: ClassVar[HybridStateManager]
    ms: ClassVar[msstore.Connection]
    loop: ClassVar[asyncio.AbstractEventLoop]
    kv: ClassVar[Any]
    stats: ClassVar[dict[str, int]]

    keys = Bundle("keys")
    # mostly keys seen before (so that calls meet earlier ones), valid ones often
    some_key = weighted(keys, st.sampled_from(VALID_KEYS))

    def __init__(self) -> None:
        super().__init__()
        self.agents = [fresh_agent() for _ in range(3)]
        self.sentinel = fresh_agent()  # not in the model: see flush_and_verify
        self.model: dict[tuple[uuid.UUID, str], Entry] = {}
        self.last_revision = 0
        self.stats["examples"] += 1

    # ---------------------------------------------------------------- plumbing

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def call(self, coro: Coroutine[Any, Any, T]) -> T | MsstoreError:
        """The call's result, or the MsstoreError it raised; anything else fails the test."""
        try:
            return self.run(coro)
        except MsstoreError as e:
            return e

    def resolve(self, agent: object) -> object:
        if isinstance(agent, AgentRef):
            return agent_form(self.agents[agent.index], agent.form)
        return agent

    def subject(self, agent: uuid.UUID, key: str) -> str:
        return f"{self.hsm.subject_prefix}{join_key(str(agent), key)}"

    def read(self, agent_id: object, key: object, **kw: Any) -> tuple[Any, str]:
        """``read_state``: (value or the error, the path: kv, log, pg or missing)."""
        before = self.hsm.counters
        got = self.call(self.hsm.read_state(agent_id, key, **kw))  # type: ignore[arg-type]
        after = self.hsm.counters
        delta = {k: after[k] - before[k] for k in
                 ("kv_hits", "hydrations", "hydrations_from_log", "hydrations_uncached",
                  "not_found", "hydration_conflicts")}
        assert delta["hydration_conflicts"] == 0, delta  # nobody else writes these keys
        if delta["kv_hits"]:
            path = "kv"
        elif delta["hydrations_from_log"]:
            path = "log"
        elif delta["hydrations"] or delta["hydrations_uncached"]:
            path = "pg"
        elif delta["not_found"]:
            path = "missing"
        else:
            path = "raised"  # refused before any lookup, or failed
        return got, path

    def check_read(self, agent: uuid.UUID, key: str, got: Any, path: str) -> None:
        """``got`` (from read_state by ``path``) is what the model says ``key`` holds."""
        entry = self.model.get((agent, key))
        if entry is None or entry.written is DELETED:
            assert isinstance(got, NotFoundError), (agent, key, got, path)
            assert path in ("missing", "log"), path  # a delete marker, a logged delete, no row
            return
        assert not isinstance(got, MsstoreError), (agent, key, got, path)
        if path == "kv":
            assert same(got, entry.stored), (path, got, entry.stored)
        elif path == "log":  # the newest logged (or dirty-set) change: the write or its copy
            assert same(got, entry.stored) or same(got, entry.written), (got, entry)
            entry.stored = got
        elif path == "pg":
            assert same(got, jsonb_order(entry.written)), (path, got, entry.written)
            entry.stored = got
        else:
            raise AssertionError(f"read of a live key {key!r} took path {path!r}: {got!r}")

    # ---------------------------------------------------------------- rules

    @initialize(target=keys, key=st.sampled_from(["plan", "a.b", "é*>"]))
    def first_key(self, key: str) -> str:
        return key

    @rule(target=keys, key=key_strategy)
    def new_key(self, key: object) -> object:
        return key

    @rule(agent=agent_strategy, key=some_key, spec=value_specs)
    def write(self, agent: object, key: object, spec: Any) -> None:
        agent_id = self.resolve(agent)
        value, size = build(spec)
        want_agent, key_ok = expected_agent(agent_id), key_verdict(key)
        expected, problems = normalise(value)
        if size is not None and size > MAX_VALUE_BYTES:
            problems.add(ValueTooLargeError)
        got = self.call(self.hsm.write_state(agent_id, key, value))  # type: ignore[arg-type]
        if isinstance(got, MsstoreError):
            self.stats["refused_writes"] += 1
            allowed: set[type[MsstoreError]] = set(problems)
            if want_agent is None:
                allowed.add(InvalidAgentIdError)
            if key_ok is not True:
                allowed.add(InvalidKeyError)
            assert allowed, f"refused a storable write: {got!r}"
            assert isinstance(got, tuple(allowed)), (got, allowed)
            if isinstance(got, InvalidAgentIdError):
                assert want_agent is None, got
            if want_agent is not None and key_ok is not False and isinstance(key, str):
                got, path = self.read(want_agent, key)  # the key holds what it held before
                if not (key_ok is None and isinstance(got, InvalidKeyError)):
                    self.check_read(want_agent, key, got, path)
            return
        self.stats["accepted_writes"] += 1
        assert want_agent is not None, f"accepted agent id {agent_id!r}"
        assert key_ok is not False, f"accepted key {key!r}"
        assert not problems, f"accepted a value that must be refused ({problems})"
        assert type(got) is int and got > self.last_revision, (got, self.last_revision)
        if size is not None:
            assert len(dumps(value)) == size
        self.last_revision = got
        assert isinstance(key, str)
        self.model[(want_agent, key)] = Entry(expected, expected, got)
        value_back, path = self.read(agent_id, key)
        assert path == "kv", path
        self.check_read(want_agent, key, value_back, path)

    @rule(agent=_valid_agent, key=keys, spec=_storable)
    def overwrite(self, agent: AgentRef, key: object, spec: Any) -> None:
        """A storable value for an agent of the example: most of these land."""
        self.write(agent, key, spec)

    @rule(agent=agent_strategy, key=some_key)
    def remove(self, agent: object, key: object) -> None:
        agent_id = self.resolve(agent)
        want_agent, key_ok = expected_agent(agent_id), key_verdict(key)
        got = self.call(self.hsm.remove_state(agent_id, key))  # type: ignore[arg-type]
        if isinstance(got, MsstoreError):
            assert isinstance(got, InvalidKeyError), got
            if isinstance(got, InvalidAgentIdError):
                assert want_agent is None, got
            else:
                assert want_agent is None or key_ok is not True, got
            return
        assert want_agent is not None and key_ok is not False, (agent_id, key)
        assert type(got) is int and got > self.last_revision, (got, self.last_revision)
        self.last_revision = got
        assert isinstance(key, str)
        self.model[(want_agent, key)] = Entry(DELETED, DELETED, got)
        self.stats["removes"] += 1

    @rule(agent=agent_strategy, key=some_key, with_default=st.booleans())
    def read_key(self, agent: object, key: object, with_default: bool) -> None:
        agent_id = self.resolve(agent)
        want_agent, key_ok = expected_agent(agent_id), key_verdict(key)
        sentinel = object()
        got, path = self.read(agent_id, key, **({"default": sentinel} if with_default else {}))
        if want_agent is None or key_ok is False:
            assert isinstance(got, InvalidKeyError), got
            assert isinstance(got, InvalidAgentIdError) == (want_agent is None), got
            return
        if isinstance(got, InvalidKeyError) and key_ok is None:
            return  # a key at the length limit, refused: fine (writes are refused the same)
        assert isinstance(key, str)
        entry = self.model.get((want_agent, key))
        if with_default and (entry is None or entry.written is DELETED):
            assert got is sentinel, got
            return
        self.check_read(want_agent, key, got, path)
        self.stats["reads"] += 1

    @rule(agent=st.integers(0, 2), key=some_key)
    def evict(self, agent: int, key: object) -> None:
        """The KV message disappears without a delete marker (what TTL expiry does): the read
        is served the newest unflushed change, else the SQL row."""
        if key_verdict(key) is not True:
            return
        assert isinstance(key, str)
        a = self.agents[agent]
        self.wait_logged()  # the log copies KV within milliseconds; expiry is never that fast
        self.run(self.ms.js.purge_stream(self.hsm.stream, subject=self.subject(a, key)))
        self.check_read(a, key, *self.read(a, key))
        self.stats["evictions"] += 1

    @rule()
    def flush(self) -> None:
        self.flush_and_verify()

    def teardown(self) -> None:
        self.flush_and_verify()
        assert self.hsm.counters["foreign_messages"] == 0, self.hsm.last_error

    # ---------------------------------------------------------------- the full check

    def uncached(self) -> bool:
        """NATS < 2.10.14 with the stream flusher: hydrations are served, not cached in KV
        (msstore._nats.sources_drop_expectations)."""
        return self.hsm.flusher_name == "stream" and old_nats(self.ms)

    def wait_logged(self) -> None:
        if self.hsm.flusher_name != "stream":
            return
        self.run(_wait_logged(self.ms, self.hsm))

    def flush_and_verify(self) -> None:
        got = self.call(self.hsm.flush())
        assert got is None, f"flush failed: {got!r}"
        self.stats["flushes"] += 1
        rows = self.run(self.ms.pool.fetch(
            "SELECT agent_id, key, value, version FROM agents.state WHERE agent_id = ANY($1)",
            list({a for a, _ in self.model} | set(self.agents))))
        sql = {(r["agent_id"], r["key"]): (r["value"], r["version"]) for r in rows}
        tombs = {(r["agent_id"], r["key"]): r["version"] for r in self.run(self.ms.pool.fetch(
            "SELECT agent_id, key, version FROM agents.state_tombstones "
            "WHERE agent_id = ANY($1)", list({a for a, _ in self.model}))) }
        live = {k for k, e in self.model.items() if e.written is not DELETED}
        assert set(sql) == live, (set(sql) ^ live)
        log = self.run(_log_name(self.ms, self.hsm))
        if log is not None:
            # The log's last message must stay (flush() reads it to know how far the log has
            # copied the bucket, and msstore's own purges keep it): make it a sentinel's, so
            # every key's copies below can go, as the flusher's purges do once committed.
            self.last_revision = self.run(self.hsm.write_state(self.sentinel, "sentinel", 0))
            self.wait_logged()
        for (agent, key), entry in self.model.items():
            # (a) a KV hit, exactly as stored
            if entry.written is not DELETED:
                got, path = self.read(agent, key)
                # (uncached hydrations leave an evicted key out of KV until it is written)
                assert path == "kv" or (self.uncached() and path in ("log", "pg")), \
                    (agent, key, path, got)
                self.check_read(agent, key, got, path)
                # (b) the row: the value as JSONB gives it back, the acknowledged revision
                value, version = sql[(agent, key)]
                assert same(value, jsonb_order(entry.written)), (value, entry.written)
                assert version == entry.revision, (key, version, entry.revision)
            else:
                assert tombs.get((agent, key)) == entry.revision, (key, tombs, entry)
            # (c) gone from KV and from the log (committed, purged): hydrated from SQL
            subject = self.subject(agent, key)
            self.run(self.ms.js.purge_stream(self.hsm.stream, subject=subject))
            if log is not None:
                self.run(self.ms.js.purge_stream(log, subject=subject))
            got, path = self.read(agent, key)
            if entry.written is DELETED:
                assert isinstance(got, NotFoundError) and path == "missing", (got, path)
                continue
            assert path == "pg", (key, path, got)
            self.check_read(agent, key, got, path)
            self.stats["hydrated_from_sql"] += 1
            if self.uncached():  # served, not cached: KV still has nothing for the key
                assert self.run(_nats.kv_read(self.kv, join_key(str(agent), key))).status \
                    == "miss"
                continue
            raw = self.run(self.kv.get(join_key(str(agent), key))).value
            assert raw == dumps(jsonb_order(entry.written)), (raw[:200], entry.written)
            assert len(raw) <= MAX_VALUE_BYTES


def old_nats(ms: msstore.Connection) -> bool:
    """A server that keeps expected-sequence headers on sourced copies (before 2.10.14)."""
    return not _nats.sources_drop_expectations(ms.nc)


async def _log_name(ms: msstore.Connection, hsm: HybridStateManager) -> str | None:
    if hsm.flusher_name != "stream":
        return None
    info = await ms.js.stream_info(hsm.stream)
    return _durable.log_name(hsm.bucket, _nats.stream_epoch(info))


async def _wait_logged(ms: msstore.Connection, hsm: HybridStateManager) -> None:
    """Until the durability log has copied the bucket's last message."""
    log = await _log_name(ms, hsm)
    assert log is not None
    wanted = (await ms.js.stream_info(hsm.stream)).state.last_seq
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        last = (await ms.js.stream_info(log)).state.last_seq
        if not wanted:
            return
        if last:
            raw: Any = await ms.js.get_msg(log, seq=last, direct=True)
            if _durable.source_revision(raw.headers) >= wanted:
                return
        await asyncio.sleep(0.005)
    raise AssertionError(f"the log did not copy revision {wanted} within 10 s")


def run_fuzz(machine: type[HybridFuzz]) -> None:
    run_state_machine_as_test(machine, settings=SETTINGS)


def tour(machine: type[HybridFuzz]) -> None:
    """Every awkward input listed above once, through the machine's own rules and checks:
    the random runs may miss some of them in a small number of examples."""
    m = machine()
    value_specs = [*AWKWARD_VALUES, Deep(5_000, "list"), Deep(5_000, "dict", math.nan),
                   Deep(254, "list"), Deep(255, "dict"), Deep(200, "tuple", -0.0),
                   Deep(254, "mixed", 1e16), Big(MAX_VALUE_BYTES - 2, "x", False),
                   Big(MAX_VALUE_BYTES - 1, "x", False), Big(MAX_VALUE_BYTES - 4, "x", True),
                   Big(MAX_VALUE_BYTES // 2 - 1, "é", False), Big(MAX_VALUE_BYTES // 2, "é", False)]
    for i, spec in enumerate(value_specs):
        m.write(AgentRef(i % 3, UUID_FORMS[i % len(UUID_FORMS)]), f"v{i % 7}", spec)
        if i % 10 == 9:
            m.flush()
    long_keys = [c * n for c in ("a", ".", "é", "🎉", "=") for n in (10_000, 1_025, 1_024, 987,
                                                                  986, 330, 246)]
    for i, key in enumerate([*AWKWARD_KEYS, *VALID_KEYS, *long_keys, 1, None, b"k", 1.5,
                             ("a",), uuid.UUID(int=7)]):
        m.write(AgentRef(i % 3, "str"), key, {"key": i})
        if i % 3 == 0:
            m.remove(AgentRef(i % 3, "hex"), key)
        m.read_key(AgentRef(i % 3, "uuid"), key, i % 2 == 0)
        if i % 15 == 14:
            m.flush()
    for form in UUID_FORMS:
        m.write(AgentRef(0, form), "form", form)
        m.read_key(AgentRef(1, form), "form", False)
    for bad in ["", "not-a-uuid", "\x00", "\ud800", "g" * 32, "0" * 31, "0" * 33, 7, None,
                b"\x00" * 16, 1.0, ["x"], uuid.uuid4().bytes]:
        m.write(bad, "plan", 1)
        m.remove(bad, "plan")
        m.read_key(bad, "plan", True)
    m.evict(0, "form")
    m.teardown()


def machine_for(hsm: HybridStateManager, ms: msstore.Connection, kv: Any,
                stats: dict[str, int]) -> type[HybridFuzz]:
    return type("HybridFuzzRun", (HybridFuzz,), {
        "hsm": hsm, "ms": ms, "loop": asyncio.get_running_loop(), "kv": kv, "stats": stats})


def new_stats() -> dict[str, int]:
    return dict.fromkeys(("examples", "accepted_writes", "refused_writes", "removes", "reads",
                          "evictions", "flushes", "hydrated_from_sql"), 0)


@pytest.mark.parametrize("flusher", ["stream", "dirty-set"])
async def test_each_listed_awkward_input_round_trips_or_raises_an_msstore_error(
        ms: msstore.Connection, unique: Callable[[str], str], flusher: str) -> None:
    stats, bucket = new_stats(), unique("fzt")
    async with HybridStateManager(ms, bucket=bucket, flusher=flusher,  # type: ignore[arg-type]
                                  flush_threshold=4, flush_interval=0.2) as hsm:
        machine = machine_for(hsm, ms, await ms.js.key_value(bucket), stats)
        await asyncio.to_thread(tour, machine)
        await hsm.flush()
        assert hsm.counters["foreign_messages"] == 0, hsm.last_error
    assert stats["accepted_writes"] >= 60 and stats["refused_writes"] >= 60, stats
    assert stats["hydrated_from_sql"] >= 40, stats
    print(f"\n{flusher} tour: {stats}")


@pytest.mark.parametrize("flusher", ["stream", "dirty-set"])
async def test_every_call_round_trips_or_raises_an_msstore_error(
        ms: msstore.Connection, unique: Callable[[str], str], flusher: str) -> None:
    stats, bucket = new_stats(), unique("fz")
    async with HybridStateManager(ms, bucket=bucket, flusher=flusher,  # type: ignore[arg-type]
                                  flush_threshold=4, flush_interval=0.2) as hsm:
        machine = machine_for(hsm, ms, await ms.js.key_value(bucket), stats)
        started = time.monotonic()
        await asyncio.to_thread(run_fuzz, machine)
        await hsm.flush()
        counters = hsm.counters
        assert counters["foreign_messages"] == 0, hsm.last_error
        if flusher == "dirty-set":  # exact there; the stream flusher's is an estimate
            assert counters["backlog"] == 0
    print(f"\n{flusher}: {stats} in {time.monotonic() - started:.1f} s")
    # the fuzz really reached every layer
    assert stats["examples"] >= MAX_EXAMPLES // 2
    assert stats["accepted_writes"] > 0 and stats["refused_writes"] > 0
    assert stats["hydrated_from_sql"] > 0
    assert counters["rows_upserted"] > 0


# --------------------------------------------------------------------------- found by the fuzz


def _tuples_in_lists(lists: int, tuples: int) -> Any:
    v: Any = 1
    for _ in range(tuples):
        v = (v,)
    for _ in range(lists):
        v = [v]
    return v


@pytest.mark.parametrize(("lists", "tuples"), [(0, 255), (254, 1), (253, 2), (0, 300)])
async def test_tuples_hiding_levels_from_the_depth_limit(
        ms: msstore.Connection, unique: Callable[[str], str], lists: int, tuples: int) -> None:
    """Found by the fuzz, minimal input: ``v = 1; for _ in range(255): v = (v,)``.

    orjson 3.13 did not count tuples towards its limit of 254 levels, so it encoded these; KV
    and PostgreSQL stored the 255-level arrays, and once the KV entry was gone no hydration
    could encode them again (read_state raised). Now ``write_state`` refuses them, saying why
    (msstore's own limit, whatever orjson allows), and nothing is stored anywhere.
    """
    agent, key = fresh_agent(), "deep"
    value = _tuples_in_lists(lists, tuples)
    async with HybridStateManager(ms, bucket=unique("fzd"), flush_threshold=4) as hsm:
        with pytest.raises(InvalidValueError, match=r"(more|deeper) than (the )?254 levels"):
            await hsm.write_state(agent, key, value)
        assert await hsm.read_state(agent, key, default=None) is None
        await hsm.flush()
        assert hsm.counters["writes"] == 0
    assert await ms.pool.fetchval(
        "SELECT count(*) FROM agents.state WHERE agent_id = $1", agent) == 0


@pytest.mark.parametrize(("lists", "tuples"), [(0, 254), (253, 1), (0, 200), (100, 100)])
async def test_tuples_within_the_depth_limit_hydrate(
        ms: msstore.Connection, unique: Callable[[str], str], lists: int, tuples: int) -> None:
    """The other side of the bug above: at most 254 levels in all, tuples included, is fine."""
    agent, key = fresh_agent(), "deep"
    value = _tuples_in_lists(lists, tuples)
    expected = normalise(value)[0]
    async with HybridStateManager(ms, bucket=unique("fzd"), flusher="dirty-set") as hsm:
        await hsm.write_state(agent, key, value)
        await hsm.flush()
        await ms.js.purge_stream(hsm.stream,
                                 subject=f"{hsm.subject_prefix}{join_key(str(agent), key)}")
        assert same(await hsm.read_state(agent, key), expected)
        assert hsm.counters["hydrations"] == 1 and hsm.counters["hydrations_from_log"] == 0


async def test_a_hydration_from_the_log_does_not_stall_it(
        ms: msstore.Connection, unique: Callable[[str], str],
) -> None:
    """Found by the fuzz in the external lane (NATS 2.9.10), minimal input: write ``k``; its KV
    message disappears (TTL) before the flush; ``read_state(k)`` hydrates it from the
    durability log; write ``other``; flush.

    The hydration is published with ``Nats-Expected-Last-Subject-Sequence: 0``; NATS 2.9
    copies that header into the log, where the subject still has ``k``'s message, so the copy
    is refused and the log stops copying the bucket: ``other`` (acknowledged) never reaches
    PostgreSQL, and flush() waited forever. Fixed: on such servers (before 2.10.14) the hydrated
    value is served without being cached; newer ones copy the hydration (and skip it).
    """
    agent = fresh_agent()
    async with HybridStateManager(ms, bucket=unique("fzh"), flush_threshold=1_000_000,
                                  flush_interval=3600.0, close_timeout=5.0) as hsm:
        await hsm.write_state(agent, "k", 1)
        await _wait_logged(ms, hsm)
        await ms.js.purge_stream(hsm.stream,
                                 subject=f"{hsm.subject_prefix}{join_key(str(agent), 'k')}")
        assert await hsm.read_state(agent, "k") == 1
        assert hsm.counters["hydrations_from_log"] == 1
        assert hsm.counters["hydrations_uncached" if old_nats(ms) else "hydrations"] == 1
        revision = await hsm.write_state(agent, "other", 2)
        try:
            async with asyncio.timeout(10):
                await hsm.flush()
        except TimeoutError:
            await ms.js.purge_stream(hsm.stream)  # let close() finish: nothing left to copy
            raise
        rows = await ms.pool.fetch(
            "SELECT key, value, version FROM agents.state WHERE agent_id = $1", agent)
        assert {r["key"]: (r["value"], r["version"]) for r in rows}["other"] == (2, revision)
