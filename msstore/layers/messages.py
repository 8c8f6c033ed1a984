"""RELATIONAL_DB for MESSAGE_LOG: ``messages.log``, append-only."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .._check import agent_uuid
from .._pg import pg_errors
from ..errors import InvalidKeyError, InvalidValueError, NotFoundError
from ..router import DataType, Hit
from ._common import check_limit
from .sql import SQLStore, as_uuid, jsonb, search_filter

_APPEND_MESSAGES = """
INSERT INTO messages.log (message_id, agent_id, channel, payload)
SELECT t.message_id, $2, $3, t.payload
FROM unnest($1::uuid[], $4::jsonb[]) WITH ORDINALITY AS t(message_id, payload, n)
ORDER BY t.n
"""


class MessageLogStore(SQLStore, data_type=DataType.MESSAGE_LOG):
    """MESSAGE_LOG in ``messages.log``: append-only, ordered by ``seq``.

    ``store(channel, payload)`` appends and returns the new message id; ``retrieve`` and
    ``remove`` take that id. ``search("<channel>")`` returns the channel's latest ``limit``
    messages, oldest first (a chat history); ``search({...})`` the latest messages whose
    payload contains the mapping, across channels.
    """

    def _channel(self, channel: object) -> str:
        if not isinstance(channel, str) or not channel:
            raise InvalidKeyError(f"a message-log channel must be a non-empty str, got "
                                  f"{channel!r}")
        return channel

    async def store(self, key: str, value: Any, *,
                    agent_id: uuid.UUID | str | None = None) -> str:
        """Append ``value`` to channel ``key``; return the new message id."""
        return (await self.append_many(key, [value], agent_id=agent_id))[0]

    async def append_many(self, channel: str, payloads: Sequence[Any], *,
                          agent_id: uuid.UUID | str | None = None) -> list[str]:
        """Append several messages to ``channel`` in one statement, in order; return ids."""
        channel = self._channel(channel)
        agent = None if agent_id is None else agent_uuid(agent_id)
        if isinstance(payloads, str | bytes | Mapping) or not isinstance(payloads, Iterable):
            raise InvalidValueError(f"append_many takes a sequence of payloads, got "
                                    f"{type(payloads).__name__}")
        encoded = [jsonb(p, self.max_value_bytes) for p in payloads]
        ids = [uuid.uuid4() for _ in encoded]
        if ids:
            with pg_errors(f"appending {len(ids)} message(s) to {channel!r}"):
                await self._pool.execute(_APPEND_MESSAGES, ids, agent, channel, encoded)
        return [str(i) for i in ids]

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
        channel = self._channel(query) if isinstance(query, str) else query
        where, arg = search_filter(query, "channel", channel, "message search",
                                    self.max_value_bytes)
        with pg_errors("searching the message log"):
            rows = await self._pool.fetch(
                "SELECT message_id, payload FROM (SELECT message_id, payload, seq "
                f"FROM messages.log WHERE {where} ORDER BY seq DESC LIMIT $2) t ORDER BY seq",
                arg, limit)
        return [Hit(str(r["message_id"]), r["payload"]) for r in rows]


__all__ = ["MessageLogStore"]
