"""JetStream publishes acknowledged on one inbox: the write half of msstore's wire details.

::

    publish(subject, data)          PUB subject _INBOX.<id>.<n> ──▶ stream
        │ future n (and a timer)                                     │
        ◀──────────── ack {"stream":…,"seq":…} on _INBOX.<id>.<n> ◀──┘

nats-py's ``js.publish`` makes every write a request of its own: a random token, a future,
``asyncio.wait_for``, the headers and subject checked and encoded again, the ack through
``json`` into a ``PubAck`` dataclass. A :class:`Publisher` keeps one wildcard inbox per
connection and one dict of futures, builds the protocol line itself while connected, and reads
the sequence out of the ack with ``orjson``: the same wire messages and the same errors
(``APIError.from_error``, ``NoStreamResponseError`` for "no stream", ``nats.errors.TimeoutError``)
for about half the client CPU. :func:`create_pipelined` does the same for a batch of
hydration creates, counting their acks instead of waiting on each.

Both fall back to ``nc.publish`` whenever nats-py is not connected (it buffers while it
reconnects, as before) or lacks the internals they use (``_raw_writes``). An ack that does not
come in time is a ``TimeoutError``: the write may still land.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import Header
from nats.js.kv import KV_DEL, KV_OP

from ._background import wait_event
from ._nats import HYDRATED, WRONG_LAST_SEQUENCE
from .errors import InvalidKeyError

#: How long a publish waits for its ack by default (seconds): nats-py's JetStream default.
ACK_TIMEOUT: Final = 5.0
_SUBJECT_CHARS: Final = re.compile(r"[-/_=.a-zA-Z0-9$]*")
_DELETE: Final = {KV_OP: KV_DEL}
_EXPECTED_LAST: Final = Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value


def _raw_writes(nc: Client) -> bool:
    """True if commands can go straight into nats-py's outgoing buffer (as ``publish`` does)."""
    return (nc.is_connected and not nc.is_draining_pubs
            and callable(getattr(nc, "_send_command", None))
            and callable(getattr(nc, "_flush_pending", None)))


def _header_block(headers: Mapping[str, str]) -> bytes:
    return ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n").encode()


def ack_error(msg: Msg, resp: Any = None) -> nats.errors.Error | None:
    """The error a JetStream publish ack reports (the one ``js.publish`` raises), else None."""
    if resp is None:
        if not msg.data:
            if msg.headers and msg.headers.get(Header.STATUS) == "503":
                return nats.js.errors.NoStreamResponseError()  # no stream on the subject
            return nats.js.errors.APIError(description=f"unexpected JetStream ack {msg.data!r}")
        try:
            resp = orjson.loads(msg.data)
        except ValueError:
            return nats.js.errors.APIError(description=f"unexpected JetStream ack {msg.data!r}")
    if not isinstance(resp, dict):
        return nats.js.errors.APIError(description=f"unexpected JetStream ack {msg.data!r}")
    err = resp.get("error")
    if err is None:
        return None
    if not isinstance(err, dict):
        return nats.js.errors.APIError(description=str(err))
    try:
        nats.js.errors.APIError.from_error(err)  # raises the typed error
    except nats.errors.Error as e:
        return e
    except Exception:  # an error without the usual fields
        return nats.js.errors.APIError(description=str(err))
    return nats.js.errors.APIError(description=str(err))  # pragma: no cover - always raises


def _expire(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


class Publisher:
    """One connection's JetStream publishes, each acknowledged on one shared wildcard inbox.

    Get it with :func:`publisher` (one per client). ``publish`` returns the stream sequence
    (for a KV bucket: the key's revision) or raises what ``js.publish`` would.
    """

    __slots__ = ("__weakref__", "_futures", "_n", "_plen", "_prefix", "_start", "nc",
                 "timeout")

    def __init__(self, nc: Client, timeout: float = ACK_TIMEOUT) -> None:
        self.nc, self.timeout = nc, timeout
        self._futures: dict[str, asyncio.Future[Msg]] = {}
        self._prefix = ""
        self._plen = 0
        self._n = 0
        self._start: asyncio.Future[None] | None = None

    async def _subscribe(self) -> None:
        if self._start is None:  # the first caller subscribes, the others wait for it
            self._start = asyncio.get_running_loop().create_future()
            try:
                prefix = self.nc.new_inbox() + "."
                await self.nc.subscribe(prefix + "*", cb=self._on_ack)
            except BaseException as e:
                start, self._start = self._start, None
                start.set_exception(e)
                start.exception()  # retrieved: the callers that waited get it raised
                raise
            self._prefix, self._plen = prefix, len(prefix)
            self._start.set_result(None)
        else:
            await asyncio.shield(self._start)

    async def _on_ack(self, msg: Msg) -> None:
        future = self._futures.get(msg.subject[self._plen:])
        if future is not None and not future.done():
            future.set_result(msg)

    async def publish(self, subject: str, data: bytes,
                      headers: Mapping[str, str] | None = None) -> int:
        """Publish to JetStream and return the stored message's sequence once acknowledged."""
        if not self._prefix:
            await self._subscribe()
        self._n += 1
        token = str(self._n)
        reply = self._prefix + token
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._futures[token] = future
        timer = loop.call_later(self.timeout, _expire, future)
        nc = self.nc
        try:
            if _raw_writes(nc) and _SUBJECT_CHARS.fullmatch(subject):
                if headers is None:
                    cmd = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(),
                                                       len(data), data)
                else:
                    hdr = _header_block(headers)
                    cmd = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
                        subject.encode(), reply.encode(), len(hdr), len(hdr) + len(data),
                        hdr, data)
                if len(data) > nc.max_payload:
                    raise nats.errors.MaxPayloadError
                nc.stats["out_msgs"] += 1
                nc.stats["out_bytes"] += len(data)
                await nc._send_command(cmd)
                queue = getattr(nc, "_flush_queue", None)
                if queue is None or queue.empty():  # a flush is queued already: it takes this
                    await nc._flush_pending()
            else:
                await nc.publish(subject, data, reply=reply, headers=dict(headers or {}) or None)
            msg = await future
        finally:
            timer.cancel()
            del self._futures[token]
        if msg.data and b'"error"' not in msg.data:
            try:  # the common case: {"stream":"KV_b","seq":42}
                return int(orjson.loads(msg.data)["seq"])
            except (ValueError, KeyError, TypeError):
                pass
        err = ack_error(msg)
        if err is not None:
            raise err
        seq = orjson.loads(msg.data).get("seq")  # '"error"' was inside a domain name
        if not isinstance(seq, int):
            raise nats.js.errors.APIError(description=f"JetStream ack without a sequence "
                                                      f"{msg.data!r}")
        return seq


_PUBLISHERS: weakref.WeakKeyDictionary[Client, Publisher] = weakref.WeakKeyDictionary()


def publisher(nc: Client) -> Publisher:
    """The :class:`Publisher` of ``nc`` (made on first use)."""
    p = _PUBLISHERS.get(nc)
    if p is None:
        p = _PUBLISHERS[nc] = Publisher(nc)
    return p


async def publish_delete(nc: Client, subject: str) -> int:
    """A KV delete marker (what ``KeyValue.delete`` sends); returns its revision."""
    return await publisher(nc).publish(subject, b"", _DELETE)


async def kv_update(nc: Client, subject: str, data: bytes, *, last: int) -> int:
    """``KeyValue.update``: put only if the key's last revision is ``last``; its new revision.

    Raises ``KeyWrongLastSequenceError`` (a ``KeyValueError``) when another write got there
    first, as nats-py does.
    """
    try:
        return await publisher(nc).publish(subject, data, {_EXPECTED_LAST: str(last)})
    except nats.js.errors.APIError as e:
        if e.err_code in WRONG_LAST_SEQUENCE:
            raise nats.js.errors.KeyWrongLastSequenceError(description=e.description) from e
        raise


async def create_hydrated(nc: Client, subject: str, data: bytes) -> bool:
    """Put ``data`` only if the key has no message at all; False if something got there first.

    Marked ``Msstore-Hydrated`` so the flushers do not write back what came from PostgreSQL.
    """
    try:
        await publisher(nc).publish(subject, data, _CREATE_HEADERS)
    except nats.js.errors.APIError as e:
        if e.err_code in WRONG_LAST_SEQUENCE:
            return False
        raise
    return True


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
        err = ack_error(msg)
        if err is None:
            self.created += 1  # '"error"' was inside a value (e.g. a domain name)
        elif isinstance(err, nats.js.errors.APIError) and err.err_code in WRONG_LAST_SEQUENCE:
            self.skipped += 1  # KV has a newer value or a delete marker: it wins
        elif self.error is None:
            self.error = err


@dataclass(frozen=True, slots=True)
class Created:
    """What :func:`create_pipelined` did: ``created``, ``skipped`` (KV had the key), the peak."""

    created: int
    skipped: int
    peak_in_flight: int


#: The headers of every hydration create (as :func:`create_hydrated` sends them), once.
_CREATE_HEADERS: Final = {Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: "0", HYDRATED: "1"}
_CREATE_HDR: Final = _header_block(_CREATE_HEADERS)


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


__all__ = ["ACK_TIMEOUT", "Created", "Publisher", "ack_error", "create_hydrated",
           "create_pipelined", "kv_update", "publish_delete", "publisher"]
