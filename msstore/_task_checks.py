"""TaskQueue's value types (statuses, a claimed task), the checks of its inputs and the
words of its refusals (no I/O).

Each check returns the value it was given (or its normalised form) and raises
:class:`~msstore.errors.InvalidValueError` saying what to pass instead.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from .errors import InvalidValueError

_INT32 = 2**31 - 1


class TaskStatus(enum.StrEnum):
    """The ``status`` column of a task the queue works."""

    PENDING = "pending"  # waiting to be claimed (maybe not yet due: run_after)
    RUNNING = "running"  # leased to a worker
    DONE = "done"
    DEAD = "dead"  # failed max_attempts times


def check_task_type(task_type: object) -> str:
    if not isinstance(task_type, str) or not task_type or len(task_type) > 50:
        raise InvalidValueError(f"task_type must be a non-empty str of at most 50 "
                                f"characters, got {task_type!r}")
    return task_type


def check_worker(worker_id: object) -> str:
    if not isinstance(worker_id, str) or not worker_id or len(worker_id) > 200:
        raise InvalidValueError(f"worker_id must be a non-empty str of at most 200 "
                                f"characters (e.g. f'{{hostname}}-{{pid}}'), got {worker_id!r}")
    return worker_id


def check_types(types: object) -> list[str] | None:
    if types is None:
        return None
    if isinstance(types, str) or not isinstance(types, Iterable):
        raise InvalidValueError(f"types must be a list of task types or None, got {types!r}")
    return [check_task_type(t) for t in types] or None


def check_priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) \
            or not -_INT32 <= priority <= _INT32:
        raise InvalidValueError(f"priority must be an int in ±{_INT32}, got {priority!r}")
    return priority


def check_attempts(max_attempts: object) -> int:
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) \
            or not 1 <= max_attempts <= _INT32:
        raise InvalidValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
    return max_attempts


def check_when(name: str, when: object) -> tuple[datetime | None, float | None]:
    """A time as (absolute, seconds from the database's now): an aware datetime or seconds."""
    if when is None:
        return None, None
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise InvalidValueError(f"{name} must be timezone-aware (e.g. "
                                    f"datetime.now(timezone.utc)), got {when!r}")
        return when, None
    if isinstance(when, int | float) and not isinstance(when, bool) and 0 <= when < 1e9:
        return None, float(when)
    raise InvalidValueError(f"{name} must be an aware datetime or a number of seconds >= 0 "
                            f"from now, got {when!r}")


def lease_lost_message(what: str, tid: uuid.UUID, worker_id: str,
                       who: asyncpg.Record | dict[str, Any] | None) -> str:
    """Why ``worker_id`` may not touch task ``tid``, from the row as it is now."""
    if who is None:
        why = "it does not exist (never enqueued, or purged)"
    elif who["status"] != TaskStatus.RUNNING:
        why = f"it is {who['status']}, not running"
    elif who["lease_owner"] != worker_id:
        why = f"its lease is held by {who['lease_owner']!r}"
    else:
        why = "its lease ran out (extend() it before it does, or claim with a longer lease)"
    return (f"{what} task {tid} refused for worker {worker_id!r}: {why}; nothing was changed "
            "— drop the task, another worker may be running it")


@dataclass(frozen=True, slots=True)
class ClaimedTask:
    """A task leased to a worker until ``lease_expires_at`` (the database's clock)."""

    task_id: str
    task_type: str
    payload: Any
    priority: int
    attempt: int  # 1 for the first claim; a retry or a reclaimed lease counts up
    max_attempts: int
    created_at: datetime
    lease_expires_at: datetime


def claimed_task(r: asyncpg.Record) -> ClaimedTask:
    return ClaimedTask(str(r["task_id"]), r["task_type"], r["payload"], r["priority"],
                       r["attempts"], r["max_attempts"], r["created_at"],
                       r["lease_expires_at"])


__all__ = [
    "ClaimedTask",
    "TaskStatus",
    "check_attempts",
    "check_priority",
    "check_task_type",
    "check_types",
    "check_when",
    "check_worker",
    "claimed_task",
    "lease_lost_message",
]
