"""Values as JSON bytes (orjson), and the asyncpg codecs that keep JSONB as Python objects.

One codec for both stores: what goes into a KV message body is byte-for-byte what goes into
the JSONB column, so a flush never re-encodes and a hydration never re-parses twice.
"""

from __future__ import annotations

from typing import Any

import orjson

from .errors import InvalidValueError, NotSerializableError, ValueTooLargeError

#: Default ceiling for one encoded value. NATS' default max_payload is 1 MiB; a KV message
#: also carries headers, so msstore refuses values above this before any I/O.
MAX_VALUE_BYTES = 1024 * 1024 - 4096

_OPTS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any, *, max_bytes: int = MAX_VALUE_BYTES) -> bytes:
    """Encode ``value`` as compact JSON; raise a typed error saying what to fix."""
    try:
        data = orjson.dumps(value, option=_OPTS)
    except TypeError as e:
        raise NotSerializableError(
            f"value of type {type(value).__name__} is not JSON-serialisable ({e}); "
            "store dicts, lists, str, int, float, bool, None, UUID, datetime or dataclasses"
        ) from e
    if _has_nul_escape(data):
        raise InvalidValueError(
            "value contains the character U+0000 (NUL), which PostgreSQL JSONB cannot store "
            "(the flush would be refused); remove it, or store such text encoded (e.g. base64)"
        )
    if len(data) > max_bytes:
        raise ValueTooLargeError(
            f"value encodes to {len(data):,} bytes, above the limit of {max_bytes:,}; "
            "split it into several keys or store a reference to it"
        )
    return data


def _has_nul_escape(data: bytes) -> bool:
    """True if JSON text ``data`` escapes a NUL character (``\\u0000``), which JSONB refuses.

    ``\\\\u0000`` (an escaped backslash, then the text ``u0000``) is not one: an escape counts
    only where an even number of backslashes precede it.
    """
    i = data.find(b"\\u0000")
    while i != -1:
        j = i
        while j > 0 and data[j - 1] == 0x5C:  # backslashes before this one
            j -= 1
        if (i - j) % 2 == 0:
            return True
        i = data.find(b"\\u0000", i + 1)
    return False


def storable(data: bytes) -> bool:
    """True if ``data`` is JSON text PostgreSQL can store as JSONB (checks foreign KV values)."""
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return not _has_nul_escape(data)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Decode JSON produced by :func:`dumps` (or by PostgreSQL)."""
    return orjson.loads(data)


def _jsonb_encode(value: Any) -> bytes:
    # JSONB binary format: a version byte (1) followed by the JSON text.
    return b"\x01" + dumps(value, max_bytes=1 << 30)


def _jsonb_decode(data: bytes) -> Any:
    return orjson.loads(data[1:])


def _json_encode(value: Any) -> str:
    return dumps(value, max_bytes=1 << 30).decode()


async def init_connection(conn: Any) -> None:
    """asyncpg ``init`` hook: JSONB/JSON in and out as Python objects, via orjson."""
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=_jsonb_encode, decoder=_jsonb_decode,
        format="binary",
    )
    await conn.set_type_codec(
        "json", schema="pg_catalog", encoder=_json_encode, decoder=orjson.loads, format="text"
    )


__all__ = ["MAX_VALUE_BYTES", "dumps", "init_connection", "loads", "storable"]
