"""The documented JSON mapping, checked against awkward generated values.

``normalise`` below is written from the mapping in ``msstore.codec``'s docstring, not from the
codec's code: it either returns what ``loads(dumps(v))`` must give back, or says which errors
``dumps(v)`` may raise (every problem the value has; a value with several problems may be
refused for any one of them). The property: ``dumps(v)`` raises exactly when the value must
be refused, with one of those error types, and otherwise round-trips to ``normalise(v)`` --
compared strictly: types too (an int is not a float), and the sign of zero.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import sys
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from msstore import (
    InvalidValueError,
    MsstoreError,
    NotSerializableError,
    ValueTooLargeError,
)
from msstore.codec import MAX_VALUE_BYTES, dumps, loads, reencode

MAX_DEPTH = 254  # orjson's limit, as documented


class Colour(enum.Enum):
    RED = "red"
    ONE = 1
    BIG = 1e20
    PAIR = (1, 2)


@dataclasses.dataclass
class Record:
    name: Any
    score: Any
    _hidden: Any = "never encoded"


# --------------------------------------------------------------------------- the oracle


class Refused(Exception):
    pass


def _key(k: Any, problems: set[type[MsstoreError]]) -> str:
    """A dict key as the mapping says it is written."""
    if isinstance(k, enum.Enum):
        return _key(k.value, problems)
    if isinstance(k, str):
        _text(k, problems)
        return k
    if k is True or k is False:
        return "true" if k else "false"
    if k is None:
        return "null"
    if isinstance(k, int):
        if not -(2**63) <= k < 2**64:
            problems.add(NotSerializableError)
        return str(k)
    if isinstance(k, float):
        if not math.isfinite(k):
            problems.add(InvalidValueError)
        return repr(k)
    if isinstance(k, uuid.UUID):
        return str(k)
    if isinstance(k, dt.date | dt.time):  # datetime is a date
        return k.isoformat()
    problems.add(NotSerializableError)
    return repr(k)


def _text(s: str, problems: set[type[MsstoreError]]) -> None:
    if "\x00" in s or any(0xD800 <= ord(c) <= 0xDFFF for c in s):
        problems.add(InvalidValueError)


def _norm(v: Any, depth: int, problems: set[type[MsstoreError]]) -> Any:
    if isinstance(v, enum.Enum):
        return _norm(v.value, depth, problems)
    if v is None or v is True or v is False:
        return v
    if isinstance(v, str):
        _text(v, problems)
        return v
    if isinstance(v, int):
        if not -(2**63) <= v < 2**64:
            problems.add(NotSerializableError)
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            problems.add(InvalidValueError)
        return v
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, bytes | bytearray | set | frozenset | Decimal):
        problems.add(NotSerializableError)
        return None
    if depth >= MAX_DEPTH:  # v is a container one level too deep
        problems.add(InvalidValueError)
        if depth > MAX_DEPTH + 10:  # surely refused: stop (values nest up to 5,000 deep)
            return None
    if isinstance(v, list) or type(v) is tuple:  # a tuple is a JSON array: a level too
        return [_norm(x, depth + 1, problems) for x in v]
    if dataclasses.is_dataclass(v):
        return {f.name: _norm(getattr(v, f.name), depth + 1, problems)
                for f in dataclasses.fields(v) if not f.name.startswith("_")}
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            key = _key(k, problems)
            if key in out:
                problems.add(InvalidValueError)  # two keys collide once converted to str
            out[key] = _norm(x, depth + 1, problems)
        return out
    problems.add(NotSerializableError)
    return None


def normalise(v: Any) -> tuple[Any, set[type[MsstoreError]]]:
    """(what loads(dumps(v)) must be, the error types dumps(v) may raise (empty: none))."""
    problems: set[type[MsstoreError]] = set()
    expected = _norm(v, 0, problems)
    return expected, problems


def same(a: Any, b: Any) -> bool:
    """Equal, with types and the sign of zero (1e16 == 10**16 in Python, but not here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


# --------------------------------------------------------------------------- awkward values

_edge_ints = st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1,
                              10**30, -(10**30)])
_edge_floats = st.sampled_from([
    1e16, -1e16, 1.2345678901234567e18, 9999999999999998.0, 1e15, 2.0**53 + 2, 1e300,
    sys.float_info.max, -sys.float_info.max, 5e-324, -5e-324, 2.2250738585072014e-308, 1e-7,
    -0.0, 0.0, math.nan, math.inf, -math.inf, 0.1, 1 / 3,
])
_awkward_text = st.sampled_from([
    "", "\x00", "a\x00b", "\ud800", "x\udfffy", "é", "🎉", "\u2028", "\x1f", '"\\', "null",
    "e+16", "-0.0", "\\u0000", "日本語", "\U0010ffff",
])
_tz = st.sampled_from([None, dt.UTC, dt.timezone(dt.timedelta(hours=5, minutes=30)),
                       dt.timezone(-dt.timedelta(hours=8))])
_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), _edge_ints, st.floats(), _edge_floats,
    st.text(max_size=8), _awkward_text, st.binary(max_size=3), st.sets(st.integers(), max_size=2),
    st.frozensets(st.booleans(), max_size=1), st.decimals(places=2, allow_nan=False),
    st.datetimes(timezones=_tz), st.dates(), st.times(), st.uuids(), st.sampled_from(Colour),
)
_keys = st.one_of(
    st.text(max_size=4), st.sampled_from(["1", "2.5", "true", "false", "null", "1e+16", "-0.0",
                                          "red", "\x00", "\ud800"]),
    st.integers(-3, 3), _edge_ints, st.sampled_from([2.5, 1e16, -0.0, math.nan, math.inf, 1e-7]),
    st.floats(), st.booleans(), st.none(), st.uuids(), st.sampled_from(Colour).filter(
        lambda c: c is not Colour.PAIR),
    st.dates(), st.datetimes(timezones=_tz), st.tuples(st.integers()),
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(_keys, children, max_size=4),
        st.builds(Record, children, children, children),
    )


def _nest(depth: int, kind: str) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = [v] if kind == "list" else {"k": v}
    return v


values = st.recursive(_leaves, _containers, max_leaves=12)


def _check(v: Any) -> None:
    expected, problems = normalise(v)
    try:
        data = dumps(v)
    except MsstoreError as e:
        assert problems, f"refused a storable value: {e}"
        assert isinstance(e, tuple(problems)), (type(e), problems, e)
        return
    except Exception as e:  # the point: nothing else may escape
        pytest.fail(f"dumps let {type(e).__name__} out: {e}")
    assert not problems, f"accepted a value that must be refused ({problems}): {data[:200]!r}"
    assert same(loads(data), expected), (loads(data), expected)


@settings(max_examples=1_500, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(values)
@example({1: "a", "1": "b"})
@example({"x": [{True: 1, "true": 2}]})
@example([math.nan])
@example({math.inf: 1})
@example(1.2345678901234567e18)
@example(-0.0)
@example(5e-324)
@example(2**64)
@example(Record(1e16, [Colour.BIG, (-0.0,)]))
def test_every_value_is_stored_exactly_or_refused(v: Any) -> None:
    _check(v)


# Deep values are built inside the test from (depth, kind): hypothesis cannot print a
# 5,000-level value when it reports a failure (its pretty-printer recurses).
@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(MAX_DEPTH - 4, MAX_DEPTH + 4), st.integers(1, 5_000)),
       st.sampled_from(["list", "dict", "tuple", "mixed"]), values)
@example(5_000, "list", None)
@example(MAX_DEPTH, "dict", 1e16)
@example(MAX_DEPTH + 1, "list", 1)
@example(MAX_DEPTH + 1, "tuple", 1)
@example(MAX_DEPTH, "tuple", 1e16)
@example(MAX_DEPTH + 1, "mixed", (1,))
def test_deep_nesting_is_stored_exactly_or_refused(depth: int, kind: str, leaf: Any) -> None:
    value: Any = leaf
    for i in range(depth):
        k = kind if kind != "mixed" else ("list", "tuple", "dict")[i % 3]
        value = [value] if k == "list" else (value,) if k == "tuple" else {"k": value}
    _check(value)


def _pg_text(data: bytes) -> str:
    """Something like PostgreSQL's text form of a JSONB value: spaces after , and :, keys
    sorted (shortest first), numbers as Python writes them (the real one is tested against
    PostgreSQL in tests/integration/test_value_roundtrip.py)."""
    def order(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: order(v[k]) for k in sorted(v, key=lambda k: (len(k.encode()), k))}
        return [order(x) for x in v] if isinstance(v, list) else v
    return json.dumps(order(loads(data)), ensure_ascii=False)


@settings(max_examples=1_000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(values)
@example([1e16, {"a": -1.2345678901234567e18}])
@example({"a": [-0.0, 5e-324, 1e-7, 2**64 - 1, -(2**63)]})
@example(["\\u0000", "\u2028", "é", "\n"])
@example(Record(1e16, [Colour.BIG, (-0.0,)]))
def test_reencode_writes_exactly_what_dumps_writes(v: Any) -> None:
    """The hydration's fast path: ``reencode(text)`` is byte for byte ``dumps(loads(text))``."""
    try:
        data = dumps(v)
    except MsstoreError:
        return
    for text in (data, data.decode(), _pg_text(data)):
        assert reencode(text) == dumps(loads(text)), text


@pytest.mark.parametrize("text", [
    "10000000000000000.0", "[1e16, -1e300]", '{"a": 1.7976931348623157e308}', "2.5", "-0",
    "18446744073709551615", '"x"', "null", '{"": [[], {}]}', "[" * 254 + "]" * 254])
def test_reencode_of_pg_texts(text: str) -> None:
    assert reencode(text) == dumps(loads(text))


def test_reencode_refuses_like_dumps() -> None:
    with pytest.raises(ValueTooLargeError):
        reencode('"' + "x" * 20 + '"', max_bytes=10)
    with pytest.raises(InvalidValueError, match="254 levels"):  # a foreign 255-level array
        reencode("[" * 255 + "]" * 255)


@settings(max_examples=100, deadline=None)
@given(st.integers(MAX_VALUE_BYTES - 20, MAX_VALUE_BYTES + 20), st.booleans())
def test_values_over_the_max_size_are_refused(n: int, wrapped: bool) -> None:
    text = "x" * n
    value: Any = [text] if wrapped else text
    size = n + 2 + (2 if wrapped else 0)  # the quotes, and the brackets
    if size > MAX_VALUE_BYTES:
        with pytest.raises(ValueTooLargeError, match=f"{size:,} bytes"):
            dumps(value)
    else:
        assert len(dumps(value)) == size
        assert loads(dumps(value)) == value


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_finite_floats_come_back_as_the_same_float_and_never_in_exponent_plus_form(
        x: float) -> None:
    data = dumps(x)
    assert b"e+" not in data  # the form JSONB would turn into an integer
    assert same(loads(data), x)


# --------------------------------------------------------------------------- the oracle itself


@pytest.mark.parametrize(("value", "expected"), [
    ((1, "a"), [1, "a"]),
    (dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC), "2026-11-26T12:00:00+00:00"),
    (dt.date(2026, 1, 2), "2026-01-02"),
    (dt.time(1, 2, 3, 4), "01:02:03.000004"),
    (dt.time(0, 0, 0, 10_000), "00:00:00.010000"),  # orjson alone writes 00:00:00.10000
    ({dt.time(0, 0, 0, 12_345): 1}, {"00:00:00.012345": 1}),
    (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
    (Record("a", 1.5), {"name": "a", "score": 1.5}),
    (Colour.PAIR, [1, 2]),
    ({1: 1, 2.5: 2, False: 3, None: 4, Colour.RED: 5, 1e16: 6, 1e-7: 7},
     {"1": 1, "2.5": 2, "false": 3, "null": 4, "red": 5, "1e+16": 6, "1e-07": 7}),
    (1e16, 1e16),
])
def test_the_documented_conversions(value: Any, expected: Any) -> None:
    assert same(normalise(value)[0], expected)
    assert same(loads(dumps(value)), expected)
