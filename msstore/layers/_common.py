"""What every layer checks the same way: ``limit``, a per-call ``ttl``, ``(key, value)`` pairs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .._check import optional_seconds, positive_int
from ..errors import InvalidOptionError, InvalidValueError


def check_limit(limit: object) -> int:
    return positive_int("limit", limit)


def check_ttl(ttl: object) -> float | None:
    """A per-call ``ttl`` (a value, not an option): seconds > 0 or None, else InvalidValueError."""
    try:
        return optional_seconds("ttl", ttl)
    except InvalidOptionError:
        raise InvalidValueError(
            f"ttl must be a positive number of seconds or None, got {ttl!r}") from None


def as_pairs(items: object, what: str) -> list[tuple[Any, Any]]:
    """``items`` (a mapping or an iterable of ``(key, value)`` pairs) as a list of pairs."""
    if isinstance(items, Mapping):
        return list(items.items())
    if isinstance(items, str | bytes) or not isinstance(items, Iterable):
        raise InvalidValueError(f"{what} takes a mapping or an iterable of (key, value) "
                                f"pairs, got {type(items).__name__}")
    found: list[tuple[Any, Any]] = []
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise InvalidValueError(f"{what} takes (key, value) pairs, got {item!r:.80}")
        found.append((item[0], item[1]))
    return found
