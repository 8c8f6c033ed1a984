"""RELATIONAL_DB for MESSAGE_LOG: ``messages.log``, append-only.

The DataStorage view of the log. Appends go through :class:`msstore.MessageLog` (the one
append statement, which gives each message its channel position), so messages stored here
page there like any other.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from .._pg import pg_errors
from ..errors import NotFoundError
from ..messages import MessageLog, check_channel
from ..router import DataType, Hit
from ._common import check_limit
from .sql import SQLStore, as_uuid, search_filter


class MessageLogStore(SQLStore, data_type=DataType.MESSAGE_LOG):
    """MESSAGE_LOG in ``messages.log``: append-only, ordered by channel position.

    ``store(channel, payload)`` appends and returns the new message id; ``retrieve`` and
    ``remove`` take that id. ``search("<channel>")`` returns the channel's latest ``limit``
    messages, oldest first (a chat history); ``search({...})`` the latest messages whose
    payload contains the mapping, across channels.
    """

    async def store(self, key: str, value: Any, *,
                    agent_id: uuid.UUID | str | None = None) -> str:
        """Append ``value`` to channel ``key``; return the new message id."""
        return (await self.append_many(key, [value], agent_id=agent_id))[0]

    async def append_many(self, channel: str, payloads: Sequence[Any], *,
                          agent_id: uuid.UUID | str | None = None) -> list[str]:
        """Append several messages to ``channel`` in one statement, in order; return ids."""
        log = MessageLog(self._pool, max_value_bytes=self.max_value_bytes)
        return [m.message_id for m in await log.append_many(channel, payloads,
                                                             agent_id=agent_id)]

    async def retrieve(self, key: str) -> Any:
        message_id = as_uuid(key, "a message id")
        with pg_errors(f"reading message {message_id}"):
            row = await self._pool.fetchrow(
                "SELECT payload FROM messages.log WHERE message_id = $1", message_id)
        if row is None:
            raise NotFoundError(f"message {message_id} not found (never appended or removed)")
        return row["payload"]

    async def remove(self, key: str) -> None:
        message_id = as_uuid(key, "a message id")
        with pg_errors(f"removing message {message_id}"):
            await self._pool.execute("DELETE FROM messages.log WHERE message_id = $1",
                                     message_id)

    async def search(self, query: Any, *, limit: int = 10) -> list[Hit]:
        limit = check_limit(limit)
        channel = check_channel(query) if isinstance(query, str) else query
        where, arg = search_filter(query, "channel", channel, "message search",
                                    self.max_value_bytes)
        # a channel's order is its position; across channels only seq orders (roughly)
        order = "position" if isinstance(query, str) else "seq"
        with pg_errors("searching the message log"):
            rows = await self._pool.fetch(
                f"SELECT message_id, payload FROM (SELECT message_id, payload, {order} AS o "
                f"FROM messages.log WHERE {where} ORDER BY {order} DESC LIMIT $2) t ORDER BY o",
                arg, limit)
        return [Hit(str(r["message_id"]), r["payload"]) for r in rows]


__all__ = ["MessageLogStore"]
