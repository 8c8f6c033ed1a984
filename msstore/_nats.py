"""The JetStream wire details msstore relies on, in one place.

::

    KV bucket ``b``   stream KV_b, subjects $KV.b.<agent>.<key>, max age = the cache TTL
        │ server-side sourcing (every acknowledged put and delete, in order, at no cost to
        ▼ the writer)
    durability log    stream MSLOG_b_<epoch>: no age limit, purged below the flushers' ack floor

The KV TTL governs the cache tier only: a change the flushers have not committed stays in the
log however long PostgreSQL or every flusher is away. One log per *incarnation* of the bucket
stream (``epoch`` = its creation time in µs): a recreated bucket restarts its sequences at 1
and gets a new log, while the old one is drained and deleted (the log itself, pulling and
acking: ``_durable.py``).

Hydration writes carry ``Msstore-Hydrated``: they copy what PostgreSQL or the log already hold,
so the flushers skip them (and NATS 2.9 does not even copy them, for their compare-and-set
header). ``flush()`` marks the point it waits for with a plain put of ``msstore-flush``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    DeliverPolicy,
    StreamInfo,
)
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from ._readthrough import KVRead
from .errors import InvalidKeyError
from .keys import decode_key, is_valid_nats_key

DELETE_OPS: Final = frozenset({KV_DEL, KV_PURGE})
HYDRATED: Final = "Msstore-Hydrated"
#: The key ``flush()`` writes to learn "everything acknowledged so far" in the log's terms: a
#: plain put, because NATS 2.9 does not copy messages that carry an expected-sequence header
#: (a hydration's compare-and-set) into a stream that sources the bucket.
FLUSH_KEY: Final = "msstore-flush"


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def kv_prefix(bucket: str) -> str:
    return f"$KV.{bucket}."


def stream_epoch(info: StreamInfo) -> int:
    """The incarnation of a stream: its creation time in microseconds (0 if unknown)."""
    return int(info.created.timestamp() * 1_000_000) if info.created else 0


# --------------------------------------------------------------------------- messages


def split_agent_key(tail: str, agents: dict[str, uuid.UUID]) -> tuple[uuid.UUID, str]:
    """``<agent>.<encoded key>`` (a subject minus its bucket prefix) as (agent id, key).

    The same result as ``split_key(tail, 1)`` plus ``uuid.UUID``, without re-validating what
    the server already checked; ``agents`` memoises the parsed ids of one batch.
    """
    token, dot, encoded = tail.partition(".")
    if not dot or not encoded:
        raise InvalidKeyError(f"{tail!r} does not have an agent token and a key")
    agent = agents.get(token)
    if agent is None:
        plain = "=" not in token and is_valid_nats_key(token)
        try:
            agent = agents[token] = uuid.UUID(token if plain else decode_key(token))
        except ValueError as e:
            raise InvalidKeyError(f"{token!r} is not an agent id") from e
    if "=" in encoded or not is_valid_nats_key(encoded):
        return agent, decode_key(encoded)
    return agent, encoded


def seq_and_time(m: Msg) -> tuple[int, int]:
    """(stream sequence, timestamp in ns) of a JetStream message, from its reply subject.

    ``Msg.metadata`` builds two dataclasses and a datetime per message; a flush of 10,000
    messages only needs these two integers. Formats other than the 9-token v1 reply subject
    (e.g. with a JetStream domain) go through ``Msg.metadata``.
    """
    tokens = (m.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5]), int(tokens[7])
    meta = m.metadata
    return int(meta.sequence.stream), int(meta.timestamp.timestamp() * 1e9)


async def newest_entries(js: JetStreamContext, kv: KeyValue, bucket: str, pattern: str, *,
                         entry_timeout: float = 5.0) -> list[KeyValue.Entry]:
    """The newest entry (value or delete marker) of every key matching ``pattern``, once through.

    nats-py's watch reports "caught up" (None) when the consumer has nothing pending and the
    client has counted no delivery yet — which can be the case while every message is still in
    the socket, so a loaded process reads nothing where keys exist. The stream's count of
    matching subjects decides instead: none, and the answer is empty; else read until the entry
    with nothing pending after it (``entry_timeout`` between entries raises nats' TimeoutError).
    """
    info = await js.stream_info(kv_stream(bucket), subjects_filter=kv_prefix(bucket) + pattern)
    if not info.state.subjects:
        return []
    watcher = await kv.watch(pattern)
    out: list[KeyValue.Entry] = []
    try:
        while True:
            entry = await watcher.updates(timeout=entry_timeout)  # type: ignore[no-untyped-call]
            if entry is None:  # nats-py's early "caught up": the subjects say otherwise
                continue
            out.append(entry)
            if not entry.delta:
                return out
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]


__all__ = ["DELETE_OPS", "FLUSH_KEY", "HYDRATED", "KV_OP", "kv_prefix", "kv_stream",
           "newest_entries", "seq_and_time", "split_agent_key", "stream_epoch"]


# --------------------------------------------------------------------------- writers' helpers

#: JSStreamWrongLastSequenceErrF, JSStreamWrongLastSequenceConstantErr: KV has a message already
WRONG_LAST_SEQUENCE: Final = frozenset({10071, 10164})


class BucketEpoch:
    """A bucket's incarnation as one writer sees it, through the revisions KV acknowledges.

    Read at start (:meth:`read`). Within one incarnation revisions only grow, so an
    acknowledged revision lower than the highest one seen means the stream was deleted and
    created again (its sequences restart at 1): :meth:`saw` then reads the epoch again. A
    bucket recreated *and* written past the old highest revision before this writer's next
    write goes unnoticed until a lower revision shows up.
    """

    __slots__ = ("_js", "_lock", "_stream", "epoch", "high")

    def __init__(self, js: JetStreamContext, bucket: str) -> None:
        self._js = js
        self._stream = kv_stream(bucket)
        self._lock = asyncio.Lock()
        self.epoch = 0  # unknown until read
        self.high = 0   # the highest revision seen in this epoch

    async def read(self) -> int:
        info = await self._js.stream_info(self._stream)
        self.epoch, self.high = stream_epoch(info), int(info.state.last_seq or 0)
        return self.epoch

    async def saw(self, revisions: Sequence[int]) -> bool:
        """Note acknowledged revisions; True if they revealed a new epoch (read again)."""
        if not revisions:
            return False
        if min(revisions) >= self.high:
            self.high = max(revisions)
            return False
        return await self.recheck(below=min(revisions))

    async def recheck(self, *, below: int | None = None) -> bool:
        """Read the epoch again (a revision went back); True if it changed.

        ``below``: the revision that went back; once another writer's re-read has seen it,
        there is nothing to read again.
        """
        async with self._lock:  # one re-read for the writers that noticed together
            if below is not None and below >= self.high:
                return False
            before = self.epoch
            return await self.read() != before


async def kv_read(kv: KeyValue, key: str) -> KVRead[bytes]:
    """One KV get as :func:`msstore._readthrough.read_through` wants it: hit, deleted or miss."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError as e:  # a delete marker is authoritative
        return KVRead("miss" if e.op is None else "deleted")
    return KVRead("hit", entry.value or b"null")


__all__ += ["WRONG_LAST_SEQUENCE", "BucketEpoch", "kv_read"]




# --------------------------------------------------------------------------- watching


async def watch_changes(js: JetStreamContext, bucket: str, tail: str,
                        cb: Callable[[Msg], Awaitable[None]]) -> Any:
    """Every change of ``$KV.<bucket>.<tail>`` from now on, headers only, to ``cb``.

    An ordered push consumer with deliver policy NEW: nothing written before it existed is
    replayed (read :func:`last_revision` to know up to where that is).
    """
    return await js.subscribe(kv_prefix(bucket) + tail, stream=kv_stream(bucket), cb=cb,
                              ordered_consumer=True, deliver_policy=DeliverPolicy.NEW,
                              headers_only=True, inactive_threshold=300.0)


async def last_revision(js: JetStreamContext, bucket: str) -> int:
    """The bucket's latest revision: the last sequence of its stream."""
    return int((await js.stream_info(kv_stream(bucket))).state.last_seq)


__all__ += ["last_revision", "watch_changes"]


def sources_drop_expectations(nc: Client) -> bool:
    """True if the server leaves expected-sequence headers out of the copies it sources.

    Before nats-server 2.10.14 (nats-server#5253) a sourced copy kept them, so a hydration's
    compare-and-set header was checked again against the durability log, the copy was refused
    and the log's source stalled. msstore then serves hydrated values without caching them in
    a logged bucket.
    """
    v = nc.connected_server_version
    try:
        return (v.major, v.minor, v.patch) >= (2, 10, 14)
    except (TypeError, ValueError):  # an unparsable version: assume the old behaviour
        return False


__all__ += ["sources_drop_expectations"]
