"""The durability log, and how the stream flusher reads it: log streams, pull requests, acks.

::

    KV_<bucket>  ──server-side source──▶  MSLOG_<bucket>_<epoch>   no age limit
    (max age = the cache TTL)             one per incarnation of the bucket's stream

Each logged message keeps the KV subject and headers; ``Nats-Stream-Source`` carries the KV
revision (``"KV_b 42 …"``). The stream flusher pulls from the log with :class:`Puller`, acks
with :func:`ack_all` after the commit, and purges the log below its ack floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import Header, RetentionPolicy, StorageType, StreamConfig, StreamSource
from nats.protocol.command import pub_cmd

from ._background import wait_event
from ._nats import (
    DELETE_OPS,
    FLUSH_KEY,
    HYDRATED,
    KV_OP,
    kv_stream,
    seq_and_time,
    split_agent_key,
    stream_epoch,
)
from .errors import InvalidKeyError
from .kv import retry_placement
from .merge import StateChange

log = logging.getLogger("msstore.flushers")

SOURCE: Final = "Nats-Stream-Source"
#: a pull request is over: 404 no messages, 408 request expired, 409 ended (e.g. max bytes)
PULL_END_STATUSES: Final = frozenset({"404", "408", "409"})
LOG_PREFIX: Final = "MSLOG_"


# --------------------------------------------------------------------------- the log


@dataclass(frozen=True, slots=True)
class LogRef:
    """One durability log: the stream name, the KV incarnation it copies, and whether its
    replicas answer direct gets (an R1 log only: a follower may lag behind its leader)."""

    name: str
    epoch: int
    direct: bool = field(default=True, compare=False)


class SourceStall:
    """When to restart a replicated log's copy of its bucket that has stopped.

    NATS rebuilds a stream's sources when the stream gets a (new) leader; a source that lost
    its origin's leader is retried with a backoff that grows while the origin's quorum is gone
    (tens of seconds measured here). ``due`` says when the log has copied nothing for
    ``after`` seconds while a copy was awaited — then :func:`step_down` makes a new leader.
    """

    def __init__(self, after: float, now: float) -> None:
        self.after, self.seen, self.since = after, -1, now

    def due(self, last_seq: int, now: float) -> bool:
        if last_seq != self.seen:
            self.seen, self.since = last_seq, now
            return False
        if now - self.since < self.after:
            return False
        self.since = now  # at most once per ``after`` seconds
        return True


async def step_down(nc: Client, ref: LogRef) -> bool:
    """Ask the log's leader to step down (a new leader sets its source up afresh)."""
    try:
        reply = await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{ref.name}", b"", timeout=2)
        return bool(orjson.loads(reply.data).get("success"))
    except (nats.errors.Error, TimeoutError, orjson.JSONDecodeError):
        return False


#: JetStream's answer to creating a stream that exists with another configuration
STREAM_NAME_IN_USE: Final = 10058


def log_name(bucket: str, epoch: int) -> str:
    return f"{LOG_PREFIX}{bucket}_{epoch}"


async def ensure_log(js: JetStreamContext, bucket: str) -> LogRef:
    """The log of the bucket's current incarnation, created (sourcing from it) if missing.

    A new log copies everything still in the bucket (the source starts at its first message),
    so writes acknowledged before the log existed are not missed.
    """
    kv_info = await js.stream_info(kv_stream(bucket))
    replicas = kv_info.config.num_replicas or 1
    ref = LogRef(log_name(bucket, stream_epoch(kv_info)), stream_epoch(kv_info), replicas == 1)
    try:
        info = await js.stream_info(ref.name)
        return LogRef(ref.name, ref.epoch, bool(info.config.allow_direct))
    except nats.js.errors.NotFoundError:
        config = StreamConfig(
            name=ref.name, sources=[StreamSource(name=kv_stream(bucket))],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            allow_direct=replicas == 1, num_replicas=replicas,
            description=f"msstore durability log of {kv_stream(bucket)} (epoch {ref.epoch})")
        try:
            await retry_placement(lambda: js.add_stream(config), f"create log {ref.name}")
        except nats.js.errors.BadRequestError as e:
            if e.err_code != STREAM_NAME_IN_USE:
                raise
            # another process created it first
    return ref


async def older_logs(js: JetStreamContext, bucket: str, current: LogRef) -> list[LogRef]:
    """Logs of earlier incarnations of ``bucket`` that still exist, oldest first."""
    prefix = f"{LOG_PREFIX}{bucket}_"
    refs = []
    for info in await js.streams_info_iterator():
        name = info.config.name or ""
        tail = name[len(prefix):]
        if name.startswith(prefix) and tail.isdigit() and name != current.name:
            refs.append(LogRef(name, int(tail), bool(info.config.allow_direct)))
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
        raw = await js.get_last_msg(ref.name, subject, direct=ref.direct)
    except nats.js.errors.NotFoundError:
        return None
    return raw  # type: ignore[return-value]  # RawStreamMsg: .headers, .data, .seq


def source_revision(headers: dict[str, str] | None) -> int:
    """The KV revision of a logged message (``Nats-Stream-Source: KV_b <seq> …``)."""
    value = headers.get(SOURCE) if headers else None
    if not value:
        raise InvalidKeyError("a logged message without its Nats-Stream-Source header")
    return int(value.split()[1])


# --------------------------------------------------------------------------- pulling


class Batch:
    """Log messages delivered to this process and not yet committed, parsed as they arrive.

    Holds each key's newest change (grouped per agent, as :func:`msstore.merge.coalesce`
    does) and every message's reply subject for the ack; the ``Msg`` objects are not kept.
    Copies of what PostgreSQL holds (``HYDRATED``) and ``flush()`` marks are acked, not merged.
    """

    __slots__ = ("_cut", "_marker", "_prefix", "agents", "by_agent", "first_at", "foreign",
                 "replies", "stamps")

    def __init__(self, prefix: str) -> None:
        self._prefix, self._cut, self._marker = prefix, len(prefix), prefix + FLUSH_KEY
        self.replies: list[str] = []
        self.by_agent: dict[uuid.UUID, dict[str, StateChange]] = {}
        self.agents: dict[str, uuid.UUID] = {}  # parse each agent id once
        self.stamps: list[int] = []  # when each change was logged (ns), for expired_unflushed
        self.foreign = 0  # messages msstore did not write
        self.first_at = 0.0  # when the oldest held message arrived (monotonic s)

    def __len__(self) -> int:
        return len(self.replies)

    def add(self, m: Msg) -> None:
        if not self.replies:
            self.first_at = time.monotonic()
        self.replies.append(m.reply)
        headers = m.headers or {}
        subject = m.subject
        if HYDRATED in headers or subject == self._marker:
            return
        try:
            if not subject.startswith(self._prefix):
                raise InvalidKeyError(subject)
            agent, key = split_agent_key(subject[self._cut:], self.agents)
            revision = source_revision(headers)
        except (InvalidKeyError, ValueError):
            self.foreign += 1
            return
        # Values are not parsed here: msstore wrote them through codec.dumps, and a foreign
        # value PostgreSQL cannot store is found when the merge refuses it.
        data = None if headers.get(KV_OP) in DELETE_OPS else m.data
        self.stamps.append(seq_and_time(m)[1])
        latest = self.by_agent.get(agent)
        if latest is None:
            latest = self.by_agent[agent] = {}
        seen = latest.get(key)
        if seen is None or seen.revision < revision:
            latest[key] = StateChange(agent, key, revision, data)

    def changes(self) -> list[StateChange]:
        return [c for latest in self.by_agent.values() for c in latest.values()]

    def expired(self, ttl: float) -> int:
        """Changes older than the bucket's max age (KV may have dropped them already)."""
        oldest = time.time_ns() - ttl * 1e9
        return sum(1 for t in self.stamps if t <= oldest)


class Puller:
    """One durable consumer's deliveries to this process, parsed into a :class:`Batch`.

    A tail task keeps one pull request open (``expires`` seconds, renewed) while fewer than
    ``limit`` messages are held, so messages are parsed as the log copies them and a flush
    only merges and acks. Each message costs one callback: nats-py's ``fetch`` awaits every
    message with a new task, a ``wait_for`` and a ``uuid4``. ``notify`` is called after each
    request (the flusher decides whether to commit).
    """

    def __init__(self, nc: Client, stream: str, durable: str, *, prefix: str, limit: int,
                 expires: float, notify: Callable[[Batch], None]) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._sub: Any = None
        self._prefix = prefix
        self.limit, self.expires, self._notify = limit, expires, notify
        self.batch = Batch(prefix)
        self._left = 0  # messages the open request may still deliver
        self._ended = asyncio.Event()  # the open request is filled or over
        self._goal = 0
        self._reached = asyncio.Event()  # len(batch) >= _goal
        self._taken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: until when the server may still deliver to us on the open request (monotonic s)
        self.open_until = 0.0

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)
        self._task = asyncio.create_task(self._tail(), name=f"msstore-tail-{self._next}")

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(Header.STATUS.value) if msg.headers else None
        if status is None:
            self.batch.add(msg)
            self._left -= 1
            if self._left <= 0:
                self._ended.set()
            if len(self.batch) >= self._goal:
                self._reached.set()
        elif status in PULL_END_STATUSES:
            self._ended.set()

    async def _tail(self) -> None:
        while True:
            room = self.limit - len(self.batch)
            if room <= 0:
                self._notify(self.batch)
                self._taken.clear()
                await self._taken.wait()
                continue
            self._left = room
            self._ended.clear()
            self.open_until = time.monotonic() + self.expires
            try:
                await self._nc.publish(self._next, orjson.dumps(
                    {"batch": room, "expires": int(self.expires * 1e9)}), reply=self._inbox)
            except nats.errors.Error as e:  # closed, or no buffer while reconnecting
                log.debug("pull request on %s failed: %r", self._next, e)
                await asyncio.sleep(self.expires)
                continue
            await wait_event(self._ended, self.expires + 0.5)
            self._notify(self.batch)

    async def filled(self, goal: int, seconds: float) -> bool:
        """Wait up to ``seconds`` until at least ``goal`` messages are held."""
        self._goal = goal
        self._reached.clear()
        if len(self.batch) >= goal:
            return True
        return await wait_event(self._reached, seconds)

    def take(self) -> Batch:
        """The held messages, for a commit; deliveries from now on go to a new batch."""
        batch, self.batch = self.batch, Batch(self._prefix)
        self._taken.set()
        return batch

    async def stop_requesting(self) -> None:
        """No new pull requests (what the open one delivers is still taken in)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def stop(self) -> None:
        await self.stop_requesting()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


ACK: Final = b""
NAK: Final = b"-NAK"
IN_PROGRESS: Final = b"+WPI"


async def reply_all(nc: Client, replies: Sequence[str], payload: bytes = ACK) -> None:
    """Send ``payload`` (an ack by default) to every reply subject in one write.

    ``Msg.ack`` does a whole ``Client.publish`` per message (~13 µs, a tenth of a
    10,000-message flush). The commands are the same bytes nats-py would send, joined; they go
    out with the next flush.
    """
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    send = getattr(nc, "_send_command", None)
    if send is None:  # a nats-py without it: one publish each
        for r in replies:
            await nc.publish(r, payload)
        return
    await send(b"".join([pub_cmd(r, "", payload) for r in replies]))
    await nc._flush_pending()


__all__ = ["IN_PROGRESS", "LOG_PREFIX", "NAK", "Batch", "LogRef", "Puller", "SourceStall",
           "ensure_log", "last_logged", "log_name", "older_logs", "reply_all", "retire_log",
           "source_revision", "step_down"]
