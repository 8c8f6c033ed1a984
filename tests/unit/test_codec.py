"""The value codec: typed errors that say what to fix, before any I/O."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from msstore import InvalidValueError, NotSerializableError, ValueTooLargeError, dumps, loads
from msstore.codec import MAX_VALUE_BYTES, _jsonb_decode, _jsonb_encode, storable


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
