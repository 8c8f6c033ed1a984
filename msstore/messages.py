"""A message log worth paging: per-channel order, keyset cursors, retention (``messages.log``).

::

    append(channel, payloads)             one statement
      ├─ bump messages.channel_heads[channel]   (row lock held until commit)
      ├─ bump messages.agent_heads[agent]       (same, when an agent is given)
      └─ INSERT rows with position = head + 1 … head + n

    page(channel, after=p)                WHERE channel = $1 AND position > p
                                          ORDER BY position LIMIT n   (idx_log_channel_position)
    conversation(agent, after=p)          WHERE agent_id = $1 AND agent_position > p …
                                                                       (idx_log_agent_position)
    trim(channel, keep=n)                 DELETE … position <= the (n+1)-th newest
    expire(channel, older_than=s)         DELETE … created_at < now() - s (idx_log_channel_created)

Why positions and not the table's IDENTITY ``seq``: a sequence value is drawn at insert, not
at commit. Appender A draws 7, B draws 8 and commits first; a reader paging ``after=6`` sees
8, moves on, and never sees 7. Bumping the channel's head row in the append statement makes
the next appender of that channel wait for the previous one's commit, so a channel's
positions become visible in order and a reader that has seen ``p`` has seen everything below
it. The price is that appends to *one* channel (and one agent) commit one at a time; other
channels append in parallel. Hold a transaction open after an append (``MessageLog(conn)``
inside ``conn.transaction()``) and that channel waits for it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from ._check import agent_uuid, positive_int, positive_seconds
from ._pg import pg_errors
from .codec import MAX_VALUE_BYTES
from .connection import Connection
from .errors import InvalidCursorError, InvalidKeyError, InvalidOptionError, InvalidValueError
from .layers.sql import jsonb

#: The largest page one call returns; a bigger ``limit`` is a typed error.
MAX_PAGE = 10_000
#: The longest channel name accepted (characters).
MAX_CHANNEL = 200
_LAST = 2**63 - 1  # "no upper bound" for a position

APPEND = """
WITH head AS (
    INSERT INTO messages.channel_heads AS h (channel, last_position) VALUES ($3, $5)
    ON CONFLICT (channel) DO UPDATE SET last_position = h.last_position + excluded.last_position
    RETURNING h.last_position - $5 AS base
), agent_head AS (
    INSERT INTO messages.agent_heads AS a (agent_id, last_position)
    SELECT $2, $5 FROM head WHERE $2::uuid IS NOT NULL
    ON CONFLICT (agent_id) DO UPDATE SET last_position = a.last_position + excluded.last_position
    RETURNING a.last_position - $5 AS base
)
INSERT INTO messages.log (message_id, agent_id, channel, position, agent_position, payload)
SELECT t.message_id, $2, $3, head.base + t.n, agent_head.base + t.n, t.payload
FROM head LEFT JOIN agent_head ON true,
     unnest($1::uuid[], $4::jsonb[]) WITH ORDINALITY AS t(message_id, payload, n)
ORDER BY t.n
RETURNING message_id, position, agent_position, created_at
"""
"""$1 ids, $2 agent (or NULL), $3 channel, $4 payloads, $5 how many. The agent head is
bumped after the channel head (it selects from it), so two appends always lock in the same
order and cannot deadlock."""

_COLUMNS = "message_id, channel, position, agent_id, agent_position, payload, created_at"
CHANNEL_FORWARD = f"""
SELECT {_COLUMNS} FROM messages.log
WHERE channel = $1 AND position > $2 AND position < $3
ORDER BY position LIMIT $4
"""
CHANNEL_BACKWARD = f"""
SELECT {_COLUMNS} FROM messages.log
WHERE channel = $1 AND position < $2
ORDER BY position DESC LIMIT $3
"""
AGENT_FORWARD = f"""
SELECT {_COLUMNS} FROM messages.log
WHERE agent_id = $1 AND agent_position > $2 AND agent_position < $3
  AND ($5::text[] IS NULL OR channel = ANY($5))
ORDER BY agent_position LIMIT $4
"""
AGENT_BACKWARD = f"""
SELECT {_COLUMNS} FROM messages.log
WHERE agent_id = $1 AND agent_position < $2
  AND ($4::text[] IS NULL OR channel = ANY($4))
ORDER BY agent_position DESC LIMIT $3
"""
TRIM = """
DELETE FROM messages.log
WHERE channel = $1 AND position <= (
    SELECT position FROM messages.log WHERE channel = $1
    ORDER BY position DESC OFFSET $2 LIMIT 1)
"""
"""Keep the newest $2 messages of channel $1: the subquery walks $2 + 1 index entries."""
EXPIRE = """
DELETE FROM messages.log
WHERE channel = $1 AND created_at < now() - make_interval(secs => $2)
"""


@dataclass(frozen=True, slots=True)
class Message:
    """One logged message. ``position`` orders it in its channel, ``agent_position`` in its
    agent's conversation (None without an agent); both are what cursors are made of."""

    message_id: str
    channel: str
    position: int
    agent_id: str | None
    agent_position: int | None
    payload: Any
    created_at: datetime


@dataclass(frozen=True, slots=True)
class MessagePage:
    """Messages oldest first, and the cursor that continues in the direction asked for.

    Forward (``after=``): pass ``next_cursor`` as ``after=`` again; it is the last position
    returned, or the same ``after`` when nothing new has arrived, so a follower polls with it
    forever. Backward (``before=``, or no cursor = the latest page): pass it as ``before=``;
    None only when the page is empty and no cursor was given. ``has_more``: more messages
    lay beyond this page in that direction when it was read.
    """

    messages: tuple[Message, ...]
    next_cursor: int | None
    has_more: bool

    def __len__(self) -> int:
        return len(self.messages)


def check_channel(channel: object) -> str:
    """``channel`` if it is a non-empty str of at most MAX_CHANNEL characters without NUL."""
    if not isinstance(channel, str) or not channel:
        raise InvalidKeyError(f"a message-log channel must be a non-empty str, got {channel!r}")
    if len(channel) > MAX_CHANNEL or "\x00" in channel:
        raise InvalidKeyError(f"a message-log channel must be at most {MAX_CHANNEL} characters "
                              f"without NUL, got {channel[:40]!r}… ({len(channel)} characters)")
    return channel


def _payloads(payloads: object, max_bytes: int) -> tuple[list[Any], list[Any]]:
    """The payloads and each one encoded once (size-checked); a str or mapping is one value,
    not a sequence of them."""
    if isinstance(payloads, str | bytes | Mapping) or not isinstance(payloads, Iterable):
        raise InvalidValueError(f"append_many takes a sequence of payloads, got "
                                f"{type(payloads).__name__}")
    items = list(payloads)
    return items, [jsonb(p, max_bytes) for p in items]


def _cursor(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _LAST:
        raise InvalidCursorError(
            f"{name} must be a position (an int >= 0, e.g. a MessagePage's next_cursor or a "
            f"Message's position), got {value!r}")
    return value


def _limit(limit: object) -> int:
    limit = positive_int("limit", limit)
    if limit > MAX_PAGE:
        raise InvalidOptionError(f"limit must be at most {MAX_PAGE} messages per page, got "
                                 f"{limit}; page with next_cursor instead")
    return limit


def _message(row: asyncpg.Record) -> Message:
    agent = row["agent_id"]
    return Message(str(row["message_id"]), row["channel"], row["position"],
                   None if agent is None else str(agent), row["agent_position"],
                   row["payload"], row["created_at"])


def _deleted(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])  # "DELETE 42"


class MessageLog:
    """Append to and page through ``messages.log`` (see the module docstring for the order).

    ``MessageLog(ms)`` runs each call on the pool; ``MessageLog(conn)`` on one asyncpg
    connection, so appends can join the caller's transaction (they become visible, and the
    channel's next appender proceeds, when it commits).
    """

    def __init__(self, target: Connection | asyncpg.Pool | asyncpg.Connection, *,
                 max_value_bytes: int = MAX_VALUE_BYTES) -> None:
        if isinstance(target, Connection):
            target = target.pool
        if not isinstance(target, asyncpg.Pool | asyncpg.Connection):
            raise InvalidOptionError(
                "MessageLog takes a msstore Connection, an asyncpg.Pool or an asyncpg."
                f"Connection, got {type(target).__name__}")
        self._db: asyncpg.Pool | asyncpg.Connection = target
        self.max_value_bytes = positive_int("max_value_bytes", max_value_bytes)

    # ------------------------------------------------------------------ appending

    async def append(self, channel: str, payload: Any, *,
                     agent_id: uuid.UUID | str | None = None) -> Message:
        """Append one message to ``channel``; return it with its position."""
        return (await self.append_many(channel, [payload], agent_id=agent_id))[0]

    async def append_many(self, channel: str, payloads: Iterable[Any], *,
                          agent_id: uuid.UUID | str | None = None) -> list[Message]:
        """Append ``payloads`` to ``channel`` in one statement, in order, at consecutive
        positions (nobody else's message lands between them)."""
        channel = check_channel(channel)
        agent = None if agent_id is None else agent_uuid(agent_id)
        items, encoded = _payloads(payloads, self.max_value_bytes)
        if not encoded:
            return []
        ids = [uuid.uuid4() for _ in encoded]
        with pg_errors(f"appending {len(ids)} message(s) to {channel!r}"):
            rows = await self._db.fetch(APPEND, ids, agent, channel, encoded, len(ids))
        by_id = {r["message_id"]: r for r in rows}
        return [Message(str(i), channel, by_id[i]["position"],
                        None if agent is None else str(agent), by_id[i]["agent_position"],
                        payload, by_id[i]["created_at"])
                for i, payload in zip(ids, items, strict=True)]

    # ------------------------------------------------------------------ paging

    async def page(self, channel: str, *, after: int | None = None, before: int | None = None,
                   limit: int = 50) -> MessagePage:
        """A page of ``channel``: after ``after`` (forward), before ``before`` (backward),
        between both (forward), or the latest ``limit`` messages when neither is given."""
        channel = check_channel(channel)
        return await self._page(f"channel {channel!r}", (channel,), after, before, limit,
                                CHANNEL_FORWARD, CHANNEL_BACKWARD, "position")

    async def conversation(self, agent_id: uuid.UUID | str, *,
                           channels: Sequence[str] | None = None, after: int | None = None,
                           before: int | None = None, limit: int = 50) -> MessagePage:
        """An agent's messages across channels (or only ``channels``), in the order the
        agent appended them; cursors are ``agent_position`` values, paged like :meth:`page`."""
        agent = agent_uuid(agent_id)
        if channels is not None:
            if isinstance(channels, str) or not isinstance(channels, Iterable):
                raise InvalidValueError(f"channels must be a sequence of channel names, got "
                                        f"{type(channels).__name__}")
            channels = [check_channel(c) for c in channels]
        return await self._page(f"agent {agent}'s conversation", (agent,), after, before,
                                limit, AGENT_FORWARD, AGENT_BACKWARD, "agent_position",
                                channels)

    async def _page(self, what: str, key: tuple[Any, ...], after: object, before: object,
                    limit: object, forward: str, backward: str, column: str,
                    *extra: Any) -> MessagePage:
        low, high, n = _cursor("after", after), _cursor("before", before), _limit(limit)
        if low is not None and high is not None and low >= high:
            raise InvalidCursorError(f"after={low} must be below before={high}: the page "
                                     "lies between them")
        with pg_errors(f"paging {what}"):
            if low is not None:
                rows = await self._db.fetch(forward, *key, low,
                                            _LAST if high is None else high, n + 1, *extra)
            else:
                rows = await self._db.fetch(backward, *key, _LAST if high is None else high,
                                            n + 1, *extra)
        more = len(rows) > n
        found = [_message(r) for r in rows[:n]]
        if low is None:
            found.reverse()
        if found:
            cursor: int | None = getattr(found[-1] if low is not None else found[0], column)
        else:
            cursor = low if low is not None else high
        return MessagePage(tuple(found), cursor, more)

    # ------------------------------------------------------------------ retention

    async def trim(self, channel: str, *, keep: int) -> int:
        """Delete all but the newest ``keep`` messages of ``channel``; return how many went."""
        channel = check_channel(channel)
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise InvalidOptionError(f"keep must be an int >= 0 (messages to keep), got {keep!r}")
        with pg_errors(f"trimming {channel!r} to {keep} message(s)"):
            return _deleted(await self._db.execute(TRIM, channel, keep))

    async def expire(self, channel: str, *, older_than: float | timedelta) -> int:
        """Delete ``channel``'s messages appended more than ``older_than`` (seconds or a
        timedelta) ago, by the server's clock; return how many went."""
        channel = check_channel(channel)
        if isinstance(older_than, timedelta):
            older_than = older_than.total_seconds()
        seconds = positive_seconds("older_than", older_than)
        with pg_errors(f"expiring {channel!r} messages older than {seconds:g} s"):
            return _deleted(await self._db.execute(EXPIRE, channel, seconds))


__all__ = ["APPEND", "MAX_CHANNEL", "MAX_PAGE", "Message", "MessageLog", "MessagePage",
           "check_channel"]
