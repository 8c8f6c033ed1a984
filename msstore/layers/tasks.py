"""RELATIONAL_DB for TASK_INFO: ``tasks.queue``."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from .._pg import pg_errors
from ..errors import InvalidValueError, NotFoundError
from ..router import DataType, Hit
from ._common import as_pairs, check_limit, check_ttl
from .sql import SQLStore, as_uuid, jsonb, search_filter

_TASK_COLUMNS = ("task_type", "status", "metadata", "expires_at")
_LIVE = "(expires_at IS NULL OR expires_at > now())"

_PURGE_EXPIRED = """
DELETE FROM tasks.queue WHERE expires_at <= now()
  AND NOT (status = 'running' AND COALESCE(lease_expires_at > now(), false))
"""
_UPSERT_TASKS = """
INSERT INTO tasks.queue AS q (task_id, task_type, payload, metadata, status, expires_at)
SELECT t.task_id, t.task_type, t.payload, COALESCE(t.metadata, '{}'::jsonb),
       COALESCE(t.status, 'pending'),
       COALESCE(t.expires_at, now() + t.ttl * interval '1 second')
FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::jsonb[], $5::text[],
            $6::timestamptz[], $7::float8[])
     AS t(task_id, task_type, payload, metadata, status, expires_at, ttl)
ON CONFLICT (task_id) DO UPDATE SET
    task_type = excluded.task_type, payload = excluded.payload,
    metadata = excluded.metadata, status = excluded.status, expires_at = excluded.expires_at
"""


class TaskStore(SQLStore, data_type=DataType.TASK_INFO):
    """TASK_INFO in ``tasks.queue``: the task id (a UUID) is the key, the value the payload.

    The value is stored whole in ``payload`` and returned as stored. If it is a mapping, its
    ``task_type`` (str), ``status`` (str, default ``pending``), ``metadata`` (mapping) and
    ``expires_at`` (aware datetime or ISO-8601 str) also fill those columns; ``ttl=`` seconds
    sets ``expires_at`` from the database clock instead. A task past ``expires_at`` reads as
    missing; :meth:`purge_expired` deletes such rows.
    """

    def _row(self, key: object, value: Any, ttl: float | None) -> tuple[Any, ...]:
        task_id = as_uuid(key, "a task id")
        payload = jsonb(value, self.max_value_bytes)
        cols: dict[str, Any] = dict.fromkeys(_TASK_COLUMNS)
        if isinstance(value, Mapping):
            cols.update((c, value[c]) for c in _TASK_COLUMNS if c in value)
        for name, size in (("task_type", 50), ("status", 20)):
            v = cols[name]
            if v is not None and (not isinstance(v, str) or not v or len(v) > size):
                raise InvalidValueError(f"task {name} must be a non-empty str of at most {size} "
                                        f"characters, got {v!r}")
        metadata = cols["metadata"]
        if metadata is not None:
            if not isinstance(metadata, Mapping):
                raise InvalidValueError(f"task metadata must be a mapping, got {metadata!r}")
            metadata = jsonb(metadata, self.max_value_bytes)
        expires_at = cols["expires_at"]
        if isinstance(expires_at, str):
            try:
                expires_at = datetime.fromisoformat(expires_at)
            except ValueError as e:
                raise InvalidValueError(f"task expires_at {expires_at!r} is not ISO-8601") from e
        if expires_at is not None and (not isinstance(expires_at, datetime)
                                       or expires_at.tzinfo is None):
            raise InvalidValueError(f"task expires_at must be a timezone-aware datetime or "
                                    f"ISO-8601 str with an offset, got {expires_at!r}")
        if expires_at is not None and ttl is not None:
            raise InvalidValueError("give either expires_at in the value or ttl=, not both")
        return (task_id, cols["task_type"], payload, metadata, cols["status"], expires_at,
                check_ttl(ttl))

    async def store(self, key: str, value: Any, *, ttl: float | None = None) -> str:
        """Insert or replace task ``key``; return its id in canonical form."""
        return (await self.store_many([(key, value)], ttl=ttl))[0]

    async def store_many(self, items: Mapping[Any, Any] | Iterable[tuple[Any, Any]], *,
                         ttl: float | None = None) -> list[str]:
        """Upsert many tasks in one statement (``unnest``); a repeated id keeps its last value."""
        pairs = as_pairs(items, "TaskStore.store_many")
        rows: dict[uuid.UUID, tuple[Any, ...]] = {}
        for key, value in pairs:
            row = self._row(key, value, ttl)
            rows[row[0]] = row
        if rows:
            columns = [list(c) for c in zip(*rows.values(), strict=True)]
            with pg_errors(f"upserting {len(rows)} task(s)"):
                await self._pool.execute(_UPSERT_TASKS, *columns)
        return [str(k) for k in rows]

    async def retrieve(self, key: str) -> Any:
        task_id = as_uuid(key, "a task id")
        with pg_errors(f"reading task {task_id}"):
            row = await self._pool.fetchrow(
                f"SELECT payload FROM tasks.queue WHERE task_id = $1 AND {_LIVE}", task_id)
        if row is None:
            raise NotFoundError(f"task {task_id} not found (never stored, removed, or past "
                                "its expires_at)")
        return row["payload"]

    async def remove(self, key: str) -> None:
        task_id = as_uuid(key, "a task id")
        with pg_errors(f"removing task {task_id}"):
            await self._pool.execute("DELETE FROM tasks.queue WHERE task_id = $1", task_id)

    async def search(self, query: Any, *, limit: int = 10) -> list[Hit]:
        """Live tasks with status ``query`` (str) or whose payload contains ``query`` (mapping),
        oldest first."""
        limit = check_limit(limit)
        where, arg = search_filter(query, "status", query, "task search", self.max_value_bytes)
        with pg_errors("searching tasks"):
            rows = await self._pool.fetch(
                f"SELECT task_id, payload FROM tasks.queue WHERE {where} AND {_LIVE} "
                "ORDER BY created_at, task_id LIMIT $2", arg, limit)
        return [Hit(str(r["task_id"]), r["payload"]) for r in rows]

    async def purge_expired(self) -> int:
        """Delete every task past its ``expires_at``, but one a worker holds a live lease on
        (:class:`msstore.TaskQueue`); return how many."""
        with pg_errors("purging expired tasks"):
            status = await self._pool.execute(_PURGE_EXPIRED)
        return int(status.split()[-1])


__all__ = ["TaskStore"]
