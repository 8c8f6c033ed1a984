"""The JetStream wire details msstore relies on, in one place.

::

    KV bucket ``b``   stream KV_b, subjects $KV.b.<agent>.<key>, max age = the cache TTL
        │ server-side sourcing (every acknowledged put and delete, in order, at no cost to
        ▼ the writer)
    durability log    stream MSLOG_b_<epoch>: no age limit, purged below the flushers' ack floor

The KV TTL governs the cache tier only: a change the flushers have not committed stays in the
log however long PostgreSQL or every flusher is away. One log per *incarnation* of the bucket
stream (``epoch`` = its creation time in µs): a recreated bucket restarts its sequences at 1
and gets a new log, while the old one is drained and deleted. Each logged message keeps the KV
subject and headers; ``Nats-Stream-Source`` carries the KV revision (``"KV_b 42 …"``).

Hydration writes carry ``Msstore-Hydrated``: they copy what PostgreSQL or the log already hold,
so the flushers skip them (and NATS 2.9 does not even copy them, for their compare-and-set
header). ``flush()`` marks the point it waits for with a plain put of ``msstore-flush``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    DeliverPolicy,
    Header,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
    StreamSource,
)
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE

from ._background import wait_event
from .errors import InvalidKeyError
from .keys import decode_key, is_valid_nats_key

DELETE_OPS: Final = frozenset({KV_DEL, KV_PURGE})
HYDRATED: Final = "Msstore-Hydrated"
#: The key ``flush()`` writes to learn "everything acknowledged so far" in the log's terms: a
#: plain put, because NATS 2.9 does not copy messages that carry an expected-sequence header
#: (a hydration's compare-and-set) into a stream that sources the bucket.
FLUSH_KEY: Final = "msstore-flush"
SOURCE: Final = "Nats-Stream-Source"
#: a pull request is over: 404 no messages, 408 request expired, 409 ended (e.g. max bytes)
PULL_END_STATUSES: Final = frozenset({"404", "408", "409"})
LOG_PREFIX: Final = "MSLOG_"


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def kv_prefix(bucket: str) -> str:
    return f"$KV.{bucket}."


def stream_epoch(info: StreamInfo) -> int:
    """The incarnation of a stream: its creation time in microseconds (0 if unknown)."""
    return int(info.created.timestamp() * 1_000_000) if info.created else 0


# --------------------------------------------------------------------------- the log


@dataclass(frozen=True, slots=True)
class LogRef:
    """One durability log: the stream name and the KV incarnation it copies."""

    name: str
    epoch: int


def log_name(bucket: str, epoch: int) -> str:
    return f"{LOG_PREFIX}{bucket}_{epoch}"


async def ensure_log(js: JetStreamContext, bucket: str) -> LogRef:
    """The log of the bucket's current incarnation, created (sourcing from it) if missing.

    A new log copies everything still in the bucket (the source starts at its first message),
    so writes acknowledged before the log existed are not missed.
    """
    kv_info = await js.stream_info(kv_stream(bucket))
    ref = LogRef(log_name(bucket, stream_epoch(kv_info)), stream_epoch(kv_info))
    try:
        await js.stream_info(ref.name)
    except nats.js.errors.NotFoundError:
        config = StreamConfig(
            name=ref.name, sources=[StreamSource(name=kv_stream(bucket))],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, allow_direct=True,
            num_replicas=kv_info.config.num_replicas,
            description=f"msstore durability log of {kv_stream(bucket)} (epoch {ref.epoch})")
        with contextlib.suppress(nats.js.errors.BadRequestError):  # another process won
            await js.add_stream(config)
    return ref


async def older_logs(js: JetStreamContext, bucket: str, current: LogRef) -> list[LogRef]:
    """Logs of earlier incarnations of ``bucket`` that still exist, oldest first."""
    prefix = f"{LOG_PREFIX}{bucket}_"
    refs = []
    for info in await js.streams_info_iterator():
        name = info.config.name or ""
        tail = name[len(prefix):]
        if name.startswith(prefix) and tail.isdigit() and name != current.name:
            refs.append(LogRef(name, int(tail)))
    return sorted(refs, key=lambda r: r.epoch)


async def retire_log(js: JetStreamContext, ref: LogRef) -> None:
    """Stop ``ref`` copying from the bucket (its incarnation is gone); it is drained next."""
    with contextlib.suppress(nats.js.errors.NotFoundError):
        info = await js.stream_info(ref.name)
        if info.config.sources:
            info.config.sources = []
            await js.update_stream(info.config)


async def last_logged(js: JetStreamContext, ref: LogRef, subject: str) -> Msg | None:
    """The latest logged change of ``subject`` (None if the log holds none)."""
    try:
        raw = await js.get_last_msg(ref.name, subject, direct=True)
    except nats.js.errors.NotFoundError:
        return None
    return raw  # type: ignore[return-value]  # RawStreamMsg: .headers, .data, .seq


def source_revision(headers: dict[str, str] | None) -> int:
    """The KV revision of a logged message (``Nats-Stream-Source: KV_b <seq> …``)."""
    value = headers.get(SOURCE) if headers else None
    if not value:
        raise InvalidKeyError("a logged message without its Nats-Stream-Source header")
    return int(value.split()[1])


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
        if e.err_code == 10071:  # wrong last sequence
            return False
        raise
    return True


# --------------------------------------------------------------------------- pulling


class Puller:
    """Pull requests for one durable consumer, delivered to a callback on one inbox.

    Each message costs a queue hand-off; nats-py's ``fetch`` awaits every message with a new
    task, a ``wait_for`` and a ``uuid4`` (about a third of a 10,000-message flush). Messages
    of an earlier, expired request that arrive late are kept for the next call: they are ours
    until acked.
    """

    def __init__(self, nc: Client, stream: str, durable: str) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._sub: Any = None
        self._got: list[Msg] = []
        self._want = 0
        self._pulled = asyncio.Event()
        #: until when the server may still deliver to us on a waiting request (monotonic s)
        self.open_until = 0.0

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(Header.STATUS.value) if msg.headers else None
        if status is None:
            self._got.append(msg)
            if len(self._got) >= self._want:
                self._pulled.set()
        elif status in PULL_END_STATUSES:
            self._pulled.set()

    async def pull(self, want: int, *, wait: bool, expires: float) -> list[Msg]:
        """Up to ``want`` messages: what is there now, or (``wait``) within ``expires`` s."""
        timeout = expires
        if len(self._got) < want:
            self._want = want
            self._pulled.clear()
            request: dict[str, Any] = {"batch": want - len(self._got)}
            if wait:
                request["expires"] = int(timeout * 1e9)
                self.open_until = time.monotonic() + timeout
            else:
                request["no_wait"] = True
            await self._nc.publish(self._next, orjson.dumps(request), reply=self._inbox)
            await wait_event(self._pulled, timeout + 0.5)
        got, self._got = self._got, []
        return got

    def take_unacked(self) -> list[Msg]:
        got, self._got = self._got, []
        return got

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


__all__ = ["DELETE_OPS", "FLUSH_KEY", "HYDRATED", "KV_OP", "LogRef", "Puller", "create_hydrated",
           "ensure_log", "kv_prefix", "kv_stream", "last_logged", "log_name", "older_logs",
           "publish_delete", "retire_log", "seq_and_time", "source_revision",
           "split_agent_key", "stream_epoch"]


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
