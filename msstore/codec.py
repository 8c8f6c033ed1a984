"""Values as JSON bytes (orjson), and the asyncpg codecs that keep JSONB as Python objects.

One codec for both stores: what goes into a KV message body is byte-for-byte what goes into
the JSONB column, so a flush never re-encodes and a hydration never re-parses twice.

The rule: **a value is stored exactly or refused, never changed silently.** Whatever
:func:`dumps` accepts, the KV bucket, the PostgreSQL JSONB column and a hydration back to KV
all store and give back: ``loads(dumps(v))`` equals ``v`` after the conversions below, and
a value read back from JSONB encodes again to the same bytes, but for the order of object
keys (JSONB sorts them: shortest first, then bytewise) and ``-0.0`` (below).

What you get back (the JSON mapping)
------------------------------------

=====================================  ===================================================
you store                              you get back
=====================================  ===================================================
``dict`` (str keys), ``list``          the same (``dict``/``list`` subclasses: plain ones)
``str``, ``bool``, ``None``            the same
``int`` in -2**63 … 2**64-1            the same
``float``, finite                      the same float (exactly; see the note below)
``-0.0``                               ``-0.0`` from KV; ``0.0`` from PostgreSQL and from
                                       KV after a hydration (``numeric`` has no negative
                                       zero). Equal in Python (``-0.0 == 0.0``); only
                                       ``math.copysign`` tells them apart (see below)
``tuple``                              ``list``
``datetime``/``date``/``time``         ISO 8601 ``str``: their ``isoformat()``
                                       (``2026-11-26T12:00:00+00:00``; naive ones stay
                                       without an offset), as values and as dict keys
``uuid.UUID``                          ``str`` (``6f1c2d9e-…``, lower case)
dataclass instance                     ``dict`` of its fields, in definition order; names
                                       that start with ``_`` are left out (orjson's rule)
``enum.Enum`` member                   its ``.value``, converted by these same rules
dict key ``int``/``float``/``bool``/   ``str``: ``1`` → ``"1"``, a float as ``repr(k)``
``None``/``UUID``/``Enum``/            (``1.5`` → ``"1.5"``, ``1e-05`` → ``"1e-05"``),
``datetime``/``date``/``time``         ``True`` → ``"true"``, ``None`` → ``"null"``, UUID
                                       and datetimes as above, an enum as its value
``orjson.Fragment``                    inserted as it is (msstore passes its own bytes)
=====================================  ===================================================

Floats: JSONB stores every number as ``numeric`` and prints it in plain decimal notation, so
``1.2345678901234567e+18`` (orjson's exponent form, used for ``abs(x) >= 1e16``) would come
back as the *integer* ``1234567890123456700`` — not equal to the float. msstore therefore
writes every float with ``abs(x) >= 1e16`` as its exact decimal integer plus ``.0``
(``1e16`` → ``10000000000000000.0``, up to 311 characters for ``1.8e308``), which every layer
parses back to the identical float. Small floats (``5e-324``, ``1e-7``) keep orjson's form;
JSONB's long decimal expansion of them parses back to the identical float too.

Negative zero is the one float whose *sign* PostgreSQL drops. msstore keeps ``-0.0`` as it is
rather than rewrite it: finding it costs a search of every encoded value (about a fifth of
``dumps``' time for a small dict), and the value read back compares equal. So a value read
back from JSONB encodes again to the same bytes, except that each ``-0.0`` becomes ``0.0``
(one byte shorter: it still fits wherever the original did).

What is refused, before any I/O (every error is an :class:`~msstore.errors.MsstoreError`)
----------------------------------------------------------------------------------------

* :class:`~msstore.errors.InvalidValueError` (also a ``ValueError``): NaN, ``inf``, ``-inf``
  (JSON has no NaN/Infinity, JSONB refuses them; orjson would write ``null``), as values or
  dict keys; dict keys that collide once converted to str (``{1: "a", "1": "b"}``), at any
  depth; the character U+0000 anywhere (JSONB cannot store it); strings or keys with lone
  surrogates (``"\\ud800"``: not Unicode text); nesting deeper than 254 levels of dicts,
  lists, tuples and dataclasses (orjson's limit, which it checks only at dicts and lists:
  tuples below the limit would slip through and the arrays they become could not be encoded
  again, so outputs long enough to nest that deep are checked), or a value that contains
  itself. (msstore requires orjson < 3.12: 3.12.0 and 3.13.0 stop counting tuples as levels
  and corrupt the heap on a value nesting them about 1,200 deep; the process aborts.)
* :class:`~msstore.errors.NotSerializableError` (also a ``TypeError``): integers outside
  64 bits (store them as ``str``); ``bytes``/``bytearray``/``memoryview`` (decode or
  base64 them); ``set``/``frozenset`` (store a sorted list); ``Decimal`` (store ``str(d)``);
  ``float``/``tuple`` subclasses such as numpy scalars or named tuples; dict keys of any
  type not listed above (e.g. tuples); any other type.
* :class:`~msstore.errors.ValueTooLargeError`: more than ``max_bytes`` once encoded.

Every message names the offending item and where it is (``value['a'][3]``) and says what to
store instead. The common case stays one ``orjson.dumps`` call: the slower checks run only
when the output shows they may be needed (``null`` or ``+`` in it: NaN and infinities come
out of orjson as ``null``, big floats as ``1e+16``) or when orjson refused the value or its
keys (non-str keys, unsupported types).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from ._codec_checks import (
    _FAST,
    _SLOW,
    MAX_DEPTH,
    _default,
    _dumps_slow,
    _fix_floats,
    _too_deep,
    check_depth,
)
from .errors import InvalidValueError, ValueTooLargeError

#: Default ceiling for one encoded value. NATS' default max_payload is 1 MiB; a KV message
#: also carries headers, so msstore refuses values above this before any I/O.
MAX_VALUE_BYTES = 1024 * 1024 - 4096

_has_null = re.compile(b"null").search

#: Output this short cannot nest more than MAX_DEPTH levels (each level takes two bytes).
_DEEP_BYTES = 2 * MAX_DEPTH + 1

def dumps(value: Any, *, max_bytes: int = MAX_VALUE_BYTES) -> bytes:
    """Encode ``value`` as compact JSON; raise a typed error saying what to fix.

    See the module docstring for exactly which conversions happen and what is refused.
    """
    try:
        data = orjson.dumps(value, default=_default, option=_FAST)
        option = _FAST
    except TypeError:  # orjson.JSONEncodeError: non-str keys, or a value it cannot encode
        data, option = _dumps_slow(value), _SLOW
    # Cheap tests on the output decide whether the slower checks can matter: NaN and ±inf come
    # out as null, floats >= 1e16 in exponent form (1e+16), NUL as \\u0000. (A compiled
    # search and bytes.find are cheaper than `in`; one-byte needles use memchr.)
    if _has_null(data) or data.find(b"+") != -1:
        try:
            data = _fix_floats(value, data, option)
        except RecursionError:
            raise _too_deep() from None
    if len(data) > _DEEP_BYTES:
        check_depth(value, data)  # tuples may hide levels from orjson's limit (see there)
    if data.find(b"\\") != -1 and _has_nul_escape(data):
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


def reencode(text: str | bytes, *, max_bytes: int = MAX_VALUE_BYTES) -> bytes:
    """Exactly ``dumps(loads(text))``, faster: for JSON text PostgreSQL gives back.

    Hydration puts SQL values back into KV re-encoded compactly, never as PostgreSQL's text
    form (larger, with spaces). A parsed JSON value holds only dicts with str keys, lists,
    str, int, float, bool and None, for which ``dumps`` writes what ``orjson.dumps`` writes
    but for big floats (``1e+16``: rewritten as exact integers) and its refusals (NUL, size);
    only texts whose output shows one of those take the full codec.
    """
    value = orjson.loads(text)
    try:
        data = orjson.dumps(value)
    except TypeError:  # deeper than orjson's limit (a foreign value): dumps says so, typed
        return dumps(value, max_bytes=max_bytes)
    if data.find(b"+") != -1 or len(data) > max_bytes or data.find(b"\\u0000") != -1:
        return dumps(value, max_bytes=max_bytes)
    if len(data) > _DEEP_BYTES:
        check_depth(value, data)  # the same depth limit as dumps, whatever orjson allows
    return data


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


__all__ = ["MAX_DEPTH", "MAX_VALUE_BYTES", "dumps", "init_connection", "loads", "reencode",
           "storable"]
