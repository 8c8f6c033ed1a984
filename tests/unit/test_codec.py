"""The value codec: typed errors that say what to fix, before any I/O."""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import enum
import math
import subprocess
import sys
import textwrap
import uuid
from decimal import Decimal

import orjson
import pytest

from msstore import (
    InvalidValueError,
    MsstoreError,
    NotSerializableError,
    ValueTooLargeError,
)
from msstore.codec import (
    MAX_DEPTH,
    MAX_VALUE_BYTES,
    _jsonb_decode,
    _jsonb_encode,
    dumps,
    loads,
    storable,
)


def test_round_trip_of_json_values() -> None:
    value = {"a": [1, 2.5, None, True], "b": {"c": "é"}, "n": 10**15}
    assert loads(dumps(value)) == value


def test_uuid_and_datetime_are_encoded_as_strings() -> None:
    u = uuid.uuid4()
    when = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
    assert loads(dumps({"id": u, "at": when})) == {"id": str(u), "at": "2026-11-26T12:00:00+00:00"}


def test_not_serialisable_names_the_type() -> None:
    with pytest.raises(NotSerializableError, match="set"):
        dumps({"x": {1, 2}})
    assert issubclass(NotSerializableError, TypeError)


def test_too_large_says_the_size_and_the_limit() -> None:
    with pytest.raises(ValueTooLargeError, match=f"{MAX_VALUE_BYTES:,}"):
        dumps("x" * MAX_VALUE_BYTES)
    assert len(dumps("x" * (MAX_VALUE_BYTES - 2))) == MAX_VALUE_BYTES


def test_jsonb_binary_codec_prefixes_the_version_byte() -> None:
    wire = _jsonb_encode({"k": 1})
    assert wire == b'\x01{"k":1}'
    assert _jsonb_decode(wire) == {"k": 1}


@pytest.mark.parametrize("value", ["a\x00b", {"k\x00": 1}, [["deep", {"x": "\x00"}]]])
def test_a_nul_character_is_refused_before_any_io(value: object) -> None:
    with pytest.raises(InvalidValueError, match="U\\+0000"):
        dumps(value)


def test_the_text_backslash_u0000_is_not_a_nul() -> None:
    text = "a literal \\u0000, and \\\\u0000 too"
    assert loads(dumps(text)) == text


@pytest.mark.parametrize(("data", "ok"), [
    (b'{"a": 1}', True), (b"not json", False), (b'"\\u0000"', False),
    (b'"\\\\u0000"', True), (b'"\\\\\\u0000"', False), (b"", False),
])
def test_storable_is_what_jsonb_accepts(data: bytes, ok: bool) -> None:
    assert storable(data) is ok


@dataclasses.dataclass
class _Big:
    x: float
    _private: int = 0


class _Color(float, enum.Enum):
    HUGE = 1e17


_Point = collections.namedtuple("_Point", "x y")


# --------------------------------------------------------------------------- refusals, each with
# the error type and the words that say what to fix


@pytest.mark.parametrize("value", [
    math.nan, math.inf, -math.inf, {"a": [1, {"b": math.nan}]}, (math.inf,), {math.nan: 1},
    {1: -math.inf},
])
def test_nan_and_infinity_are_refused_not_written_as_null(value: object) -> None:
    with pytest.raises(InvalidValueError, match="JSON has no NaN or Infinity") as e:
        dumps(value)
    assert "JSONB" in str(e.value)


def test_the_nan_message_names_where_it_is() -> None:
    with pytest.raises(InvalidValueError, match=r"value\['a'\]\[1\]\['b'\] is nan"):
        dumps({"a": [None, {"b": math.nan}]})


@pytest.mark.parametrize("value", [
    {1: "a", "1": "b"}, {True: 1, "true": 2}, {None: 1, "null": 2},
    {"x": [{"y": {2: 1, "2": 2}}]}, {uuid.UUID(int=1): 1, str(uuid.UUID(int=1)): 2},
    {1.5: "a", "1.5": "b"},
])
def test_keys_that_collide_once_converted_to_str_are_refused(value: object) -> None:
    with pytest.raises(InvalidValueError, match=r"both become .* once converted to str"):
        dumps(value)


def test_non_str_keys_that_do_not_collide_become_str() -> None:
    assert loads(dumps({3: "a", 2.5: "b", True: "c", None: "d"})) == {
        "3": "a", "2.5": "b", "true": "c", "null": "d"}


@pytest.mark.parametrize("n", [2**64, -(2**63) - 1, 10**30, -(10**30)])
def test_integers_beyond_64_bits_say_so_and_suggest_str(n: int) -> None:
    with pytest.raises(NotSerializableError, match="must fit in 64 bits") as e:
        dumps({"n": [n]})
    assert "str(n)" in str(e.value) and "value['n'][0]" in str(e.value)


@pytest.mark.parametrize("n", [2**64 - 1, -(2**63), 2**63])
def test_integers_at_the_64_bit_edges_round_trip(n: int) -> None:
    assert loads(dumps(n)) == n and type(loads(dumps(n))) is int


@pytest.mark.parametrize(("value", "error", "words"), [
    (b"raw", NotSerializableError, "base64"),
    (bytearray(b"x"), NotSerializableError, "base64"),
    ({"s": {1, 2}}, NotSerializableError, "set.*store a list"),
    (frozenset(), NotSerializableError, "frozenset.*store a list"),
    (Decimal("1.10"), NotSerializableError, r"str\(d\)"),
    ("bad \ud800 text", InvalidValueError, "lone surrogate"),
    ({"k\udfff": 1}, InvalidValueError, "lone surrogate"),
    ({(1, 2): "tuple key"}, NotSerializableError, "cannot be a JSON object key"),
    (object(), NotSerializableError, "not JSON-serialisable"),
    (_Point(1, 2), NotSerializableError, "not JSON-serialisable"),
])
def test_each_refusal_is_typed_and_says_what_to_fix(value: object, error: type,
                                                     words: str) -> None:
    with pytest.raises(error, match=words):
        dumps(value)


def _nested(depth: int, value: object = 1) -> object:
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    assert loads(dumps(_nested(MAX_DEPTH))) == _nested(MAX_DEPTH)
    for depth in (MAX_DEPTH + 1, 5_000):
        with pytest.raises(InvalidValueError, match=f"deeper than {MAX_DEPTH}"):
            dumps(_nested(depth))


@pytest.mark.parametrize(("lists", "tuples"), [(0, 255), (254, 1), (253, 2), (0, 1_500),
                                               (100, 200)])
def test_tuples_count_as_levels(lists: int, tuples: int) -> None:
    """orjson checks its limit only at dicts and lists; the arrays tuples become count."""
    value: object = 1
    for _ in range(tuples):
        value = (value,)
    value = _nested(lists, value)
    with pytest.raises(InvalidValueError, match=f"(more|deeper) than (the )?{MAX_DEPTH} levels"):
        dumps(value)


def test_tuples_within_the_limit_encode_and_encode_again() -> None:
    value: object = 1e16
    for _ in range(MAX_DEPTH - 100):
        value = (value,)
    data = dumps(_nested(100, value))
    assert data == b"[" * MAX_DEPTH + b"10000000000000000.0" + b"]" * MAX_DEPTH
    assert dumps(loads(data)) == data  # what a hydration does


def test_a_value_that_contains_itself_is_refused() -> None:
    cycle: list[object] = []
    cycle.append(cycle)
    with pytest.raises(InvalidValueError, match="contains itself"):
        dumps({"c": cycle})


@pytest.mark.parametrize("value", [
    b"x", {1, 2}, Decimal(1), "\ud800", 2**70, math.nan, {1: 1, "1": 2}, _nested(300),
    {(1,): 2}, object(), "\x00", "x" * MAX_VALUE_BYTES,
])
def test_only_msstore_errors_escape(value: object) -> None:
    with pytest.raises(MsstoreError):
        dumps(value)


# --------------------------------------------------------------------------- floats


@pytest.mark.parametrize(("value", "text"), [
    (1e16, b"10000000000000000.0"),
    (1.2345678901234567e18, b"1234567890123456768.0"),
    (-1e16, b"-10000000000000000.0"),
    (9999999999999998.0, b"9999999999999998.0"),
    (1e15, b"1000000000000000.0"),
    (5e-324, b"5e-324"),
    (-0.0, b"-0.0"),
    (0.1, b"0.1"),
])
def test_floats_are_written_so_jsonb_gives_them_back(value: float, text: bytes) -> None:
    assert dumps(value) == text
    assert loads(text) == value and type(loads(text)) is float


def test_the_biggest_float_is_its_exact_integer() -> None:
    data = dumps({"max": sys.float_info.max, "tiny": 5e-324})
    assert data == b'{"max":%d.0,"tiny":5e-324}' % int(sys.float_info.max)
    assert loads(data) == {"max": sys.float_info.max, "tiny": 5e-324}


def test_big_floats_inside_dataclasses_enums_and_tuples() -> None:
    assert loads(dumps([_Big(1e20), _Color.HUGE, (1e300,)])) == [
        {"x": 1e20}, 1e17, [1e300]]
    assert b"e+" not in dumps([_Big(1e20), _Color.HUGE, (1e300,)])


def test_text_that_looks_like_a_trigger_is_left_alone() -> None:
    text = {"s": "null e+ 1e+16 -0.0 \\u0000", "n": None}
    assert loads(dumps(text)) == text


def test_a_fragment_passes_through() -> None:
    assert dumps(orjson.Fragment(b'{"a":1}')) == b'{"a":1}'




def test_deeply_nested_tuples_are_refused_and_the_process_survives() -> None:
    """orjson 3.12/3.13 corrupted the heap here (the process aborted); msstore pins < 3.12.

    Run in a child process, so that a regression shows as this test failing, not as pytest
    dying: every value must be refused with InvalidValueError, and the child must then
    allocate and exit normally.
    """
    script = textwrap.dedent("""
        from msstore.codec import dumps
        from msstore.errors import InvalidValueError
        refused = 0
        for depth in (300, 1_200, 1_312, 2_100, 5_000):
            for shape in ("tuple", "mixed"):
                for leaf in ({}, 1, "x" * 5_000, (None, None)):
                    v = leaf
                    for i in range(depth):
                        k = shape if shape == "tuple" else ("list", "tuple", "dict")[i % 3]
                        v = [v] if k == "list" else (v,) if k == "tuple" else {"k": v}
                    try:
                        dumps(v)
                    except InvalidValueError:
                        refused += 1
                    junk = [bytes(64) for _ in range(2_000)]
        print(refused)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["40"]
