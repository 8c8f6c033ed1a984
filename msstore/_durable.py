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
import time
from collections.abc import Sequence
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
from ._nats import kv_stream, stream_epoch
from .errors import InvalidKeyError
from .kv import retry_placement

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



async def ack_all(nc: Client, msgs: Sequence[Msg]) -> None:
    """Acknowledge ``msgs`` in one write to the connection.

    An ack is an empty publish to the message's reply subject; ``Msg.ack`` does a whole
    ``Client.publish`` per message (~13 µs, a tenth of a 10,000-message flush). The commands
    are the same bytes nats-py would send, joined; they go out with the next flush.
    """
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    send = getattr(nc, "_send_command", None)
    if send is None:  # a nats-py without it: one publish each
        for m in msgs:
            await m.ack()
        return
    await send(b"".join([pub_cmd(m.reply, "", b"") for m in msgs]))
    await nc._flush_pending()


__all__ = ["LOG_PREFIX", "LogRef", "Puller", "SourceStall", "ack_all", "ensure_log", "last_logged",
           "log_name", "older_logs", "retire_log", "source_revision", "step_down"]
