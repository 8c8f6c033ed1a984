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
import contextlib
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    DeliverPolicy,
    Header,
    StreamInfo,
)
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from ._background import wait_event
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


async def publish_delete(js: JetStreamContext, subject: str) -> int:
    """A KV delete marker (what ``KeyValue.delete`` sends); returns its revision."""
    ack = await js.publish(subject, b"", headers={KV_OP: KV_DEL})
    return int(ack.seq)


async def create_hydrated(js: JetStreamContext, subject: str, data: bytes) -> bool:
    """Put ``data`` only if the key has no message at all; False if something got there first.

    Marked ``Msstore-Hydrated`` so the flushers do not write back what came from PostgreSQL.
    """
    headers = {Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: "0", HYDRATED: "1"}
    try:
        await js.publish(subject, data, headers=headers)
    except nats.js.errors.APIError as e:
        if e.err_code in WRONG_LAST_SEQUENCE:
            return False
        raise
    return True


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


__all__ = ["DELETE_OPS", "FLUSH_KEY", "HYDRATED", "KV_OP", "create_hydrated", "kv_prefix",
           "kv_stream", "newest_entries", "publish_delete", "seq_and_time", "split_agent_key",
           "stream_epoch"]


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


class _CreateAcks:
    """The JetStream acks of one batch of creates, counted as they arrive on its inbox."""

    __slots__ = ("created", "error", "in_flight", "skipped", "wake", "wake_at")

    def __init__(self) -> None:
        self.in_flight = 0  # published, not acknowledged yet
        self.created = 0
        self.skipped = 0
        self.error: nats.errors.Error | None = None
        self.wake_at = 0  # wake the publisher once in_flight drops to this
        self.wake = asyncio.Event()

    async def on_ack(self, msg: Msg) -> None:
        data = msg.data
        if data and b'"error"' not in data:
            self.created += 1  # the common case, without parsing the ack
        else:
            self._unusual(msg)
        self.in_flight -= 1
        if self.in_flight <= self.wake_at or self.error is not None:
            self.wake.set()

    def _unusual(self, msg: Msg) -> None:
        resp: Any = None
        with contextlib.suppress(ValueError):
            resp = orjson.loads(msg.data) if msg.data else None
        if isinstance(resp, dict) and "error" not in resp:
            self.created += 1  # '"error"' was inside a value (e.g. a domain name)
            return
        err: nats.errors.Error
        if isinstance(resp, dict) and isinstance(resp["error"], dict):
            if resp["error"].get("err_code") in WRONG_LAST_SEQUENCE:
                self.skipped += 1  # KV has a newer value or a delete marker: it wins
                return
            try:
                nats.js.errors.APIError.from_error(resp["error"])  # raises the typed error
            except nats.errors.Error as e:
                err = e
            except Exception:  # an error without the usual fields
                err = nats.js.errors.APIError(description=str(resp["error"]))
        elif msg.headers and msg.headers.get("Status") == "503":
            err = nats.js.errors.NoStreamResponseError()  # no stream listens on the subject
        else:
            err = nats.js.errors.APIError(description=f"unexpected JetStream ack {msg.data!r}")
        if self.error is None:
            self.error = err


@dataclass(frozen=True, slots=True)
class Created:
    """What :func:`create_pipelined` did: ``created``, ``skipped`` (KV had the key), the peak."""

    created: int
    skipped: int
    peak_in_flight: int


#: The headers of every hydration create (as :func:`create_hydrated` sends them), once.
_CREATE_HEADERS: Final = {Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: "0", HYDRATED: "1"}
_CREATE_HDR: Final = ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in
                                               _CREATE_HEADERS.items()) + "\r\n").encode()
_SUBJECT_CHARS: Final = re.compile(r"[-/_=.a-zA-Z0-9$]*")


def _raw_writes(nc: Client) -> bool:
    """True if creates can go straight into nats-py's outgoing buffer (see create_pipelined)."""
    return (nc.is_connected and not nc.is_draining_pubs
            and callable(getattr(nc, "_send_command", None))
            and callable(getattr(nc, "_flush_pending", None)))


async def create_pipelined(nc: Client, prefix: str, items: Sequence[tuple[str, bytes]], *,
                           window: int, ack_timeout: float) -> Created:
    """:func:`create_hydrated` for many keys: ``(key, data)`` under ``prefix``, pipelined.

    The same compare-and-set publish (``Nats-Expected-Last-Subject-Sequence: 0``: only if KV
    has no message for the key, so a newer value *or a delete marker* wins; marked
    ``Msstore-Hydrated``), acknowledged on one inbox subscription for the whole batch instead
    of one request (future, timer, JSON, dataclass) per key. At most ``window`` are in flight;
    the window is refilled once half of it is acknowledged. "Wrong last sequence" counts as
    skipped, any other error is raised; no ack progress within ``ack_timeout`` raises
    ``nats.errors.TimeoutError``.

    While connected, each window's ``HPUB`` commands are built here with the headers encoded
    once and handed to nats-py's outgoing buffer in one piece (``_send_command``, then
    ``_flush_pending``, as ``publish`` does): ``publish`` re-encodes and re-checks the same
    headers and subject for every message, a quarter of a hydration's time. Otherwise
    (reconnecting, draining, a nats-py without those methods) every create goes through
    ``nc.publish``. Keys must be encoded keys (:func:`msstore.keys.encode_key`).
    """
    if not items:
        return Created(0, 0, 0)
    if not _SUBJECT_CHARS.fullmatch(prefix + "".join(k for k, _ in items)):
        raise InvalidKeyError("create_pipelined takes encoded keys only (see msstore.keys)")
    refill_at = window // 2
    acks = _CreateAcks()
    n, sent, peak = len(items), 0, 0
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=acks.on_ack)
    try:
        while True:
            if acks.error is not None:
                raise acks.error
            room = max(min(window - acks.in_flight, n - sent), 0)
            batch = items[sent:sent + room]
            acks.in_flight += room  # before the publishes: their acks may come during them
            peak = max(peak, acks.in_flight)
            if _raw_writes(nc):
                await _send_raw(nc, prefix, inbox, batch)
            else:
                for key, data in batch:
                    await nc.publish(prefix + key, data, reply=inbox, headers=_CREATE_HEADERS)
            sent += room
            acks.wake_at = refill_at if sent < n else 0
            if acks.in_flight <= acks.wake_at:
                if sent >= n:
                    break
                continue
            acks.wake.clear()
            if not await wait_event(acks.wake, ack_timeout):
                raise nats.errors.TimeoutError(
                    f"{acks.in_flight} of {n} creates not acknowledged within {ack_timeout} s")
    finally:
        with contextlib.suppress(nats.errors.Error):  # closed connection: no sub left
            await sub.unsubscribe()
    if acks.error is not None:
        raise acks.error  # cannot happen after all acks, but never report a failure as done
    if acks.created + acks.skipped != n:  # pragma: no cover - a broken server
        raise nats.js.errors.APIError(
            description=f"{acks.created + acks.skipped} acks for {n} creates")
    return Created(acks.created, acks.skipped, peak)


async def _send_raw(nc: Client, prefix: str, inbox: str,
                    batch: Sequence[tuple[str, bytes]]) -> None:
    """``nc.publish(prefix + key, data, reply=inbox, headers=_CREATE_HEADERS)`` for a batch."""
    if not batch:
        return
    hdr, hl = _CREATE_HDR, len(_CREATE_HDR)
    head = f" {inbox} {hl} ".encode()
    limit, out, size = nc.max_payload, [], 0
    for key, data in batch:
        if len(data) > limit:
            raise nats.errors.MaxPayloadError
        out.append(b"HPUB %s%s%d\r\n%s%s\r\n"
                   % ((prefix + key).encode(), head, hl + len(data), hdr, data))
        size += len(data)
    nc.stats["out_msgs"] += len(batch)
    nc.stats["out_bytes"] += size
    await nc._send_command(b"".join(out))
    await nc._flush_pending()


async def kv_read(kv: KeyValue, key: str) -> KVRead[bytes]:
    """One KV get as :func:`msstore._readthrough.read_through` wants it: hit, deleted or miss."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError as e:  # a delete marker is authoritative
        return KVRead("miss" if e.op is None else "deleted")
    return KVRead("hit", entry.value or b"null")


__all__ += ["WRONG_LAST_SEQUENCE", "BucketEpoch", "Created", "create_pipelined", "kv_read"]




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
