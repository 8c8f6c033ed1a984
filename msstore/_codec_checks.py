"""The slow paths of :func:`msstore.codec.dumps`: only values the fast path flags come here.

* orjson refused the value (non-str dict keys, or a type it cannot encode): encode with the
  keys converted to str and refuse keys that then collide; else find the first problem and
  its path (``value['n'][0] is the integer …``) for a message that says what to fix;
* the output may hold NaN/±inf (written as ``null``) or floats >= 1e16 in exponent form,
  which JSONB would give back as different integers: refuse the former, rewrite the latter
  as exact integers plus ``.0``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import json
import math
import uuid
from decimal import Decimal
from typing import Any, Final

import orjson

from .errors import InvalidValueError, MsstoreError, NotSerializableError

#: The deepest nesting of containers orjson encodes (it refuses one level more).
MAX_DEPTH = 254

#: Floats at least this large (in magnitude) are written as exact integers plus ``.0``.
_BIG = 1e16

# datetime/date/time go through _default (isoformat): orjson 3.11–3.13 write a time's
# microseconds 10000..99999 without their leading zero (00:00:00.010000 -> "00:00:00.10000").
_FAST = orjson.OPT_PASSTHROUGH_DATETIME
_SLOW = _FAST | orjson.OPT_NON_STR_KEYS  # non-str dict keys become str


def _default(obj: Any) -> Any:
    if isinstance(obj, _dt.date | _dt.time):  # a datetime is a date
        return obj.isoformat()
    raise TypeError

_KEY_TYPES = (str, int, float, bool, type(None), uuid.UUID, enum.Enum, _dt.datetime, _dt.date,
              _dt.time)


# --------------------------------------------------------------------------- slow paths


def _dumps_slow(value: Any) -> bytes:
    """Encode with non-str keys converted to str, refusing keys that then collide."""
    try:
        data = orjson.dumps(value, default=_default, option=_SLOW)
    except TypeError as e:
        raise _diagnose(value, e) from e
    try:
        if _has_special_key(value):  # float and time keys: see _key
            data = _redump(value, _SLOW)
        json.loads(data, object_pairs_hook=_refuse_duplicates, parse_float=_ignore,
                   parse_int=_ignore)
    except RecursionError:
        raise _too_deep() from None
    except _NonFinite:
        raise _non_finite(value) from None
    return data


def _too_deep() -> InvalidValueError:
    return InvalidValueError(
        f"value nests containers deeper than the {MAX_DEPTH} levels JSON encoding allows "
        "(tuples count; Python's recursion limit was reached checking it); flatten it")


def check_depth(value: Any, data: bytes) -> None:
    """Refuse ``value`` if its encoding ``data`` nests deeper than :data:`MAX_DEPTH`.

    orjson's own limit differs between versions (3.11 encodes 255 levels, 3.12+ let tuples
    past it unnoticed), and whatever is accepted must encode again once read back: KV and
    PostgreSQL store the arrays, and a hydration re-encodes them. One limit, checked on the
    output, keeps every version and every path (``dumps``, ``reencode``) the same.
    """
    if _nesting_exceeds(data, MAX_DEPTH):
        raise InvalidValueError(
            f"value nests containers more than {MAX_DEPTH} levels deep (tuples count: they "
            "are JSON arrays once stored), more than msstore can encode again once read back "
            "from PostgreSQL or KV; flatten it (e.g. store parts under separate keys)")


_BRACKETS_ONLY: Final = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE: Final = bytes(b for b in range(256) if b not in b'[]{}"')


def _nesting_exceeds(data: bytes, limit: int) -> bool:
    """True if JSON text ``data`` nests more than ``limit`` levels (C-speed byte operations).

    The brackets outside strings, reduced by removing every innermost ``[]`` pair per round:
    the rounds it takes are the nesting depth. Text with an escaped quote takes orjson's
    parse instead (its strings cannot be cut at the quotes).
    """
    rest = data.translate(_BRACKETS_ONLY, _NOT_STRUCTURE)
    if rest.count(b"[") <= limit:  # too few brackets to nest that deep (the common case)
        return False
    if data.find(b"\\") != -1 and data.find(b'\\"') != -1:
        try:
            orjson.dumps(orjson.loads(data))
        except (orjson.JSONEncodeError, orjson.JSONDecodeError):
            return True
        return False
    rest = rest.replace(b'""', b"")
    if rest.find(b'"') != -1:  # some strings hold brackets: drop what is inside quotes
        rest = b"".join(rest.split(b'"')[::2])
    for _ in range(limit):
        if not rest:
            return False
        rest = rest.replace(b"[]", b"")
    return bool(rest)


def _has_special_key(x: Any) -> bool:
    if isinstance(x, dict):
        return (any(type(k) is float or type(k) is _dt.time for k in x)
                or any(_has_special_key(v) for v in x.values()))
    if isinstance(x, list | tuple):
        return any(_has_special_key(v) for v in x)
    if isinstance(x, enum.Enum):
        return _has_special_key(x.value)
    if _is_dataclass(x):
        return any(_has_special_key(v) for _, v in _dataclass_items(x))
    return False


def _key(k: Any) -> Any:
    """A float key as ``repr(k)`` (orjson writes 1e-05 as "0.00001" as a key but 1e-5 as a
    value); a time key as ``isoformat()`` (orjson drops a leading zero of its microseconds)."""
    if type(k) is float:
        if not math.isfinite(k):
            raise _NonFinite
        return repr(k)
    if type(k) is _dt.time:
        return k.isoformat()
    return k


def _ignore(_text: str) -> None:
    return None


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> None:
    if len(pairs) > 1:
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise InvalidValueError(
                    f"two dict keys both become {k!r} once converted to str (e.g. 1 and '1', "
                    "or True and 'true'), so one entry would be lost on read; make the keys "
                    "distinct, or use str keys only"
                )
            seen.add(k)
    return None


class _NonFinite(Exception):
    """Raised inside the float scan; turned into an InvalidValueError with a path."""


def _fix_floats(value: Any, data: bytes, option: int) -> bytes:
    """Refuse NaN/inf; re-encode with exact integers when some float is >= 1e16 in size."""
    try:
        needed = _scan_floats(value, option == _SLOW)
    except _NonFinite:
        raise _non_finite(value) from None
    if not needed:
        return data
    return _redump(value, option)


def _redump(value: Any, option: int) -> bytes:
    """Encode ``_rebuild(value)``: tuples become lists, which orjson counts as levels."""
    try:
        return orjson.dumps(_rebuild(value), default=_default, option=option)
    except TypeError as e:
        raise _diagnose(value, e) from e


def _non_finite(value: Any) -> InvalidValueError:
    path, bad = _locate(value, _is_non_finite)
    return InvalidValueError(
        f"{path} is {bad!r}: JSON has no NaN or Infinity and PostgreSQL JSONB refuses them "
        "(orjson would silently write null); store None, a sentinel str such as 'NaN', or a "
        "finite number")


def _is_non_finite(x: Any, is_key: bool) -> bool:
    if isinstance(x, enum.Enum):
        x = x.value
    return type(x) is float and not math.isfinite(x)


_LEAVES = frozenset({str, int, bool, type(None)})


def _scan_floats(x: Any, keys: bool) -> bool:
    """True if ``x`` holds a float >= 1e16 in size; raise _NonFinite on NaN/inf.

    ``keys``: also look at dict keys (only non-str keys can be floats, and orjson accepts
    those only on the slow path). Only called on values orjson encoded, so nesting is at most
    MAX_DEPTH deep. Leaves are tested inline: this runs for every value with a null in it.
    """
    if isinstance(x, dict):
        if keys:
            for k in x:
                if type(k) is not str and _is_non_finite(k, True):
                    raise _NonFinite
        items: Any = x.values()
    elif isinstance(x, list | tuple):
        items = x
    elif type(x) is float:
        items = (x,)
    elif isinstance(x, enum.Enum):
        items = (x.value,)
    elif _is_dataclass(x):
        items = [v for _, v in _dataclass_items(x)]
    else:
        return False
    needed = False
    for v in items:
        t = type(v)
        if t in _LEAVES:
            continue
        if t is float:
            if v - v != 0.0:  # NaN or ±inf (inf - inf is NaN)
                raise _NonFinite
            if v >= _BIG or v <= -_BIG:
                needed = True
        elif _scan_floats(v, keys):
            needed = True
    return needed


def _rebuild(x: Any) -> Any:
    """``x`` with every float >= 1e16 in size as its exact integer + ``.0`` (a Fragment), and
    time keys as their isoformat()."""
    t = type(x)
    if t is float:
        if x - x != 0.0:  # NaN or ±inf
            raise _NonFinite
        return orjson.Fragment(b"%d.0" % int(x)) if abs(x) >= _BIG else x
    if t in _LEAVES:
        return x
    if isinstance(x, dict):
        out = {_key(k): _rebuild(v) for k, v in x.items()}
        if len(out) != len(x):  # 1.5 and "1.5": merged by the comprehension itself
            _refuse_duplicates([(str(_key(k)), None) for k in x])
        return out
    if isinstance(x, list | tuple):
        return [_rebuild(v) for v in x]
    if isinstance(x, enum.Enum):
        return _rebuild(x.value)
    if _is_dataclass(x):
        return {k: _rebuild(v) for k, v in _dataclass_items(x)}
    return x


def _is_dataclass(x: Any) -> bool:
    return hasattr(type(x), "__dataclass_fields__") and not isinstance(x, type)


def _dataclass_items(x: Any) -> list[tuple[str, Any]]:
    """The attributes orjson encodes: ``__dict__`` (or the fields, with slots), no ``_x``."""
    try:
        attrs = vars(x)
    except TypeError:  # slots
        return [(f.name, getattr(x, f.name)) for f in dataclasses.fields(x)
                if not f.name.startswith("_")]
    return [(k, v) for k, v in attrs.items() if not k.startswith("_")]


# --------------------------------------------------------------------------- diagnosis


def _children(x: Any, path: str) -> list[tuple[str, Any, bool]] | None:
    """(path, child, is_key) of a container orjson descends into; None for a leaf."""
    if isinstance(x, dict):
        out: list[tuple[str, Any, bool]] = []
        for k, v in x.items():
            out.append((f"key {k!r} of {path}", k, True))
            out.append((f"{path}[{k!r}]", v, False))
        return out
    if isinstance(x, list) or type(x) is tuple:
        return [(f"{path}[{i}]", v, False) for i, v in enumerate(x)]
    if _is_dataclass(x):
        return [(f"{path}.{k}", v, False) for k, v in _dataclass_items(x)]
    return None


def _locate(value: Any, pred: Any) -> tuple[str, Any]:
    """The path and item of the first item (depth first) for which ``pred(item, is_key)``."""
    stack: list[tuple[str, Any, bool, int]] = [("value", value, False, 0)]
    while stack:
        path, x, is_key, depth = stack.pop()
        if pred(x, is_key):
            return path, x
        if isinstance(x, enum.Enum):
            stack.append((f"{path}.value", x.value, is_key, depth))
            continue
        kids = _children(x, path) if depth <= MAX_DEPTH else None
        if kids:
            stack.extend((p, c, k, depth + 1) for p, c, k in reversed(kids))
    return "value", value


def _diagnose(value: Any, error: Exception) -> MsstoreError:
    """The typed error for a value orjson refused, naming the first offending item."""
    found = _problem(value, "value", 0, set(), False)
    if found is not None:
        return found
    if "Recursion" in str(error):
        return InvalidValueError(
            f"value nests containers deeper than the {MAX_DEPTH} levels JSON encoding allows "
            "(tuples count); flatten it (e.g. store parts under separate keys)")
    return NotSerializableError(
        f"value of type {type(value).__name__} is not JSON-serialisable ({error}); store "
        "dicts, lists, str, int, float, bool, None, UUID, datetime or dataclasses")


def _surrogate(s: str, path: str) -> MsstoreError | None:
    if s.isascii():
        return None
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return InvalidValueError(
            f"{path} contains the lone surrogate {s[e.start]!r} at position {e.start}, which "
            "is not Unicode text (it has no UTF-8 form); fix the text, e.g. decode bytes "
            "with errors='replace', or store it encoded (e.g. base64)")
    return None


_SUPPORTED = ("store dicts, lists, str, int, float, bool, None, UUID, datetime/date/time, "
              "enums or dataclasses")


def _problem(x: Any, path: str, depth: int, on_path: set[int],
             is_key: bool) -> MsstoreError | None:
    """The first reason (depth first) why orjson refuses ``x``; None if none found."""
    if isinstance(x, str):
        return _surrogate(x, path)
    if isinstance(x, enum.Enum):
        return _problem(x.value, f"{path}.value", depth, on_path, is_key)
    if isinstance(x, int) and not isinstance(x, bool):
        if not -(2**63) <= x < 2**64:
            return NotSerializableError(
                f"{path} is the integer {_short(x)}, which does not fit in 64 bits: JSON "
                "integers must fit in 64 bits (signed, -2**63 … 2**63-1, or unsigned, up to "
                "2**64-1); store larger integers as str (str(n)) and convert them back on read")
        return None
    if is_key:
        if type(x) is float or isinstance(x, _KEY_TYPES):
            return None
        return NotSerializableError(
            f"{path} is of type {_qualname(x)}, which cannot be a JSON object key; use "
            "str keys (int, float, bool, None, UUID, enum and datetime keys are converted "
            "to str; nothing else is)")
    if x is None or type(x) is float or type(x) is bool:
        return None
    if isinstance(x, uuid.UUID | _dt.datetime | _dt.date | _dt.time | orjson.Fragment):
        return None
    if isinstance(x, bytes | bytearray | memoryview):
        return NotSerializableError(
            f"{path} is {type(x).__name__}, which JSON cannot hold; decode it to str "
            "(e.g. data.decode('utf-8')) or store it base64-encoded "
            "(base64.b64encode(data).decode())")
    if isinstance(x, set | frozenset):
        return NotSerializableError(
            f"{path} is a {type(x).__name__}, which JSON cannot hold; store a list "
            "(e.g. sorted(s)) and rebuild the set on read")
    if isinstance(x, Decimal):
        return NotSerializableError(
            f"{path} is Decimal({str(x)!r}), which JSON (via orjson) cannot hold; store "
            "str(d) to keep every digit (Decimal(s) on read), or float(d) if a float will do")
    kids = _children(x, path)
    if kids is None:
        return NotSerializableError(
            f"{path} is of type {_qualname(x)}, which is not JSON-serialisable; {_SUPPORTED}"
            " (convert it, e.g. to a dict or str, before storing it)")
    if id(x) in on_path:
        return InvalidValueError(f"{path} contains itself (a reference cycle); JSON values "
                                 "are trees: break the cycle before storing")
    if depth >= MAX_DEPTH:  # tuples count (see check_depth)
        return InvalidValueError(
            f"value nests containers deeper than {MAX_DEPTH} levels (at {path[:80]}…), the "
            "most JSON encoding allows; flatten it (e.g. store parts under separate keys)")
    on_path.add(id(x))
    for p, child, k in kids:
        found = _problem(child, p, depth + 1, on_path, k)
        if found is not None:
            return found
    on_path.discard(id(x))
    return None


def _short(n: int) -> str:
    text = str(n)
    return text if len(text) <= 30 else f"{text[:12]}…{text[-6:]} ({len(text)} digits)"


def _qualname(x: Any) -> str:
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


# --------------------------------------------------------------------------- checks, decoding
