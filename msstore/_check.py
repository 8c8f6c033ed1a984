"""Option checks shared by every manager: bad options raise :class:`InvalidOptionError`.

Each check returns the value it was given, so constructors read ``self.x = positive_int("x", x)``.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from typing import Any, TypeVar

from .errors import InvalidAgentIdError, InvalidOptionError, NotOpenError

T = TypeVar("T")


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionError(f"{name} must be a positive int, got {value!r}")
    return value


def non_negative_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidOptionError(f"{name} must be an int >= 0, got {value!r}")
    return value


def positive_seconds(name: str, value: Any) -> float:
    """``value`` if it is a number of seconds > 0 (int or float, finite)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not 0 < value < float("inf"):
        raise InvalidOptionError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)


def optional_seconds(name: str, value: Any) -> float | None:
    """``None`` (no limit) or a number of seconds > 0."""
    return None if value is None else positive_seconds(name, value)


def one_of(name: str, value: T, choices: Collection[T]) -> T:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise InvalidOptionError(f"{name} must be one of {tuple(choices)!r}, got {value!r}")
    return value


def not_open(what: str, state: str, how: str) -> NotOpenError:
    """The error for using ``what`` while it is ``state`` (``how`` says how to open it)."""
    return NotOpenError(f"{what} is {state}: {how}")




def agent_uuid(agent_id: object) -> uuid.UUID:
    """``agent_id`` as a UUID; anything else raises :class:`InvalidAgentIdError`."""
    if isinstance(agent_id, uuid.UUID):
        return agent_id
    if isinstance(agent_id, str):
        try:
            return uuid.UUID(agent_id)
        except ValueError as e:
            raise InvalidAgentIdError(
                f"agent id {agent_id!r} is not a UUID; use uuid.uuid4() or its str()") from e
    raise InvalidAgentIdError(
        f"agent ids must be UUIDs (uuid.UUID or str), got {type(agent_id).__name__}")


__all__ = ["agent_uuid", "non_negative_int", "not_open", "one_of", "optional_seconds",
           "positive_int", "positive_seconds"]
