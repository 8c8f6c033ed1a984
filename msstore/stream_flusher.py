"""The stream flusher: a durable pull consumer on the bucket's durability log (crash-safe).

::

    KV_b ──server-side source──▶ MSLOG_b_<epoch>  (no age limit; see msstore._nats)
                                    │ durable pull consumer, shared by processes
                                    ▼
    tail: an open pull request ─▶ parse as delivered (revision from Nats-Stream-Source),
    keep each key's newest change ─▶ (threshold, interval, flush()) Committer ─▶ ack
                                    │ then, at most once a second
                                    ▼
                          purge the log below the ack floor

``flush()`` writes a marker into the bucket, tells the other processes' flushers to commit
what they hold (a core NATS message on ``msstore.flush.<bucket>``), and waits until the log
has copied the marker and the ack floor has passed it. When the bucket is recreated (a new
epoch), the old log stops copying, is drained completely (across epochs the later merge wins,
so no newer change may be committed first), and is deleted once it has been quiet for a
second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy

from . import _durable, _nats
from ._durable import Batch, LogRef, Puller
from ._nats import KV_OP
from .flushers import _FIRST_RECHECK, Flusher
from .kv import DEFAULT_LEADER_WAIT, retry_not_stored
from .merge import StateChange

log = logging.getLogger("msstore.flushers")

#: seconds a replicated log may copy nothing while a flush waits for it, before its leader is
#: asked to step down (see :class:`msstore._durable.SourceStall`)
SOURCE_STALL = 5.0


def peer_subject(bucket: str) -> str:
    """Where ``flush()`` asks every flusher of the bucket to commit what it holds now."""
    return f"msstore.flush.{bucket}"


def _unacked(ci: ConsumerInfo) -> int:
    return int(ci.num_pending or 0) + int(ci.num_ack_pending or 0)


class StreamFlusher(Flusher):
    """A durable pull consumer on the bucket's durability log; acks only after the commit.

    Several processes using the same durable name share the work; a crashed process' unacked
    messages are redelivered after ``ack_wait`` to whoever fetches next. When the bucket is
    recreated (a new epoch), the old log stops copying, is drained, and is deleted.
    """

    name = "stream"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._log = LogRef("", 0)
        self._old: list[LogRef] = []  # earlier incarnations still to drain, oldest first
        self._pullers: dict[str, Puller] = {}
        self._switch = asyncio.Lock()
        self._refreshing = asyncio.Lock()
        self._local = 0  # writes since the last consumer-info refresh
        self._since_flush = 0
        self._remote = 0  # unflushed messages in the logs at the last refresh
        self._holding: list[str] = []  # reply subjects of the batch being committed
        self._next_purge = 0.0
        self._purged: dict[str, int] = {}  # log -> the sequence it was last purged below
        self._settling: dict[str, tuple[int, float]] = {}  # old log -> (last seq, since)
        self._noted = 0  # the highest revision this process wrote, and how far the log had
        self._sourced_to = 0  # copied it at the last drain
        self._monitor: asyncio.Task[None] | None = None
        self._peers: Any = None  # the subscription to other processes' flush() calls

    async def start(self) -> None:
        self._log = await _durable.ensure_log(self.js, self.s.bucket)
        self._old = await _durable.older_logs(self.js, self.s.bucket, self._log)
        for ref in [*self._old, self._log]:
            if ref is not self._log:
                await _durable.retire_log(self.js, ref)
            await self._open(ref)
        await self._refresh()
        self._peers = await self.nc.subscribe(peer_subject(self.s.bucket), cb=self._on_peer)
        await super().start()
        self._monitor = asyncio.create_task(self._watch(), name="msstore-stream-backlog")

    async def _open(self, ref: LogRef) -> None:
        config = ConsumerConfig(
            durable_name=self.s.durable, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, ack_wait=self.s.ack_wait, max_deliver=-1,
            max_ack_pending=max(4 * self.s.batch_size, 1000),
            description="msstore HybridStateManager write-behind flusher")
        try:
            await self.js.add_consumer(ref.name, config)
        except nats.js.errors.BadRequestError:
            await self.js.consumer_info(ref.name, self.s.durable)  # exists, other settings
        puller = Puller(self.nc, ref.name, self.s.durable, prefix=_nats.kv_prefix(self.s.bucket),
                        limit=self.s.batch_size, expires=self.s.fetch_timeout,
                        notify=self._on_batch)
        await puller.start()
        self._pullers[ref.name] = puller

    async def check_epoch(self) -> None:
        """Follow a recreated bucket: retire the old log, open the new incarnation's."""
        async with self._switch:
            epoch = await self._kv_epoch()
            if epoch == self._log.epoch:
                return
            old, self._log = self._log, await _durable.ensure_log(self.js, self.s.bucket)
            log.warning("bucket %s was recreated (epoch %d -> %d): draining the old log",
                        self.s.bucket, old.epoch, self._log.epoch)
            self._noted = self._sourced_to = 0
            await _durable.retire_log(self.js, old)
            self._old.append(old)
            await self._open(self._log)

    def _on_batch(self, batch: Batch) -> None:
        """After each pull request: commit once enough is held, or before ack_wait runs out
        (the server would redeliver what is held)."""
        if len(batch) >= min(self.s.flush_threshold, self.s.batch_size) or (
                batch and time.monotonic() - batch.first_at >= self.s.ack_wait / 2):
            self.worker.wake.set()

    async def _on_peer(self, _msg: Msg) -> None:
        self.worker.wake.set()

    def note_write(self, change: StateChange) -> None:
        if change.revision > self._noted:
            self._noted = change.revision
        self._local += 1
        self._since_flush += 1
        if self._since_flush >= self.s.flush_threshold:
            self.worker.wake.set()

    def backlog(self) -> int:
        return self._remote + self._local

    async def _consumer(self, ref: LogRef) -> ConsumerInfo:
        info: ConsumerInfo = await self.js.consumer_info(ref.name, self.s.durable)
        return info

    async def _refresh(self) -> None:
        """The backlog estimate: unacked messages in the logs, plus writes noted since."""
        async with self._refreshing:  # two refreshes at once would both subtract local_then
            local_then = self._local
            total = 0
            for ref in [*self._old, self._log]:
                with contextlib.suppress(nats.js.errors.NotFoundError):  # drained, deleted
                    total += _unacked(await self._consumer(ref))
            self._remote = total
            self._local -= local_then

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.s.backlog_refresh)
            try:
                await self.check_epoch()
                await self._refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("backlog refresh failed: %r", e)

    async def pending(self, agent: uuid.UUID, key: str, subject: str) -> StateChange | None:
        # The log's newest message for the key is the newest acknowledged change (KV missed,
        # so nothing newer exists); committed ones are purged only below the ack floor.
        raw: Any = await _durable.last_logged(self.js, self._log, subject)
        if raw is None:
            return None
        deleted = (raw.headers or {}).get(KV_OP) in _nats.DELETE_OPS
        return StateChange(agent, key, _durable.source_revision(raw.headers),
                           None if deleted else bytes(raw.data or b""))

    # ---------------------------------------------------------------- flush() bookkeeping

    async def _target(self) -> object:
        """(log, sequence): the log message that copied the last write acknowledged so far."""
        await self.check_epoch()
        subject = _nats.kv_prefix(self.s.bucket) + _nats.FLUSH_KEY
        marker = await retry_not_stored(lambda: self.js.publish(subject, b""), "mark a flush",
                                        DEFAULT_LEADER_WAIT)
        # Other processes' tails may hold older messages: ask them to commit now.
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(peer_subject(self.s.bucket), b"")
        ref = self._log
        return ref, await self._sourced(ref, int(marker.seq))

    async def _sourced(self, ref: LogRef, wanted: int, patience: float | None = None) -> int:
        """Wait until ``ref`` has copied the bucket up to revision ``wanted`` (the server copies
        asynchronously, within milliseconds); return the log sequence that covers it."""
        recheck = _FIRST_RECHECK
        deadline = None if patience is None else time.monotonic() + patience
        stall = _durable.SourceStall(SOURCE_STALL, time.monotonic())
        while True:
            last = (await self.js.stream_info(ref.name)).state.last_seq
            if not wanted:
                return int(last)
            if last:
                raw: Any = await self.js.get_msg(ref.name, seq=last, direct=ref.direct)
                if _durable.source_revision(raw.headers) >= wanted:
                    return int(last)
            kv = (await self.js.stream_info(self.stream)).state
            if not kv.messages or kv.first_seq > wanted:
                return int(last)  # nothing up to `wanted` is left for the source to copy
            if deadline is not None and time.monotonic() > deadline:
                return int(last)
            if not ref.direct and stall.due(int(last), time.monotonic()):  # replicated log
                log.warning("%s copied nothing from the bucket for %.0f s: asking its leader "
                            "to step down (a new leader restarts the copy)", ref.name,
                            SOURCE_STALL)
                if await _durable.step_down(self.nc, ref):
                    self.committer.metrics.add("log_source_restarts")
            await asyncio.sleep(recheck)
            recheck = min(2 * recheck, self.s.poll_interval)

    async def _done(self, target: object) -> bool:
        assert isinstance(target, tuple)
        ref: LogRef = target[0]
        last: int = target[1]
        try:
            ci = await self._consumer(ref)
        except nats.js.errors.NotFoundError:
            return not self._old  # an old log, drained and deleted
        floor = ci.ack_floor.stream_seq if ci.ack_floor else 0
        done = bool((floor >= last or not _unacked(ci)) and not self._old)
        if done:
            await self._refresh()  # the backlog estimate behind backpressure, now
        return done

    # ---------------------------------------------------------------- draining

    async def _drain(self) -> None:
        self._since_flush = 0
        if self._noted > self._sourced_to:  # writes this process made: wait for their copies
            noted = self._noted
            await self._sourced(self._log, noted, patience=self.s.flush_interval)
            self._sourced_to = noted
        # Older incarnations first, completely: across epochs the later merge wins, so no
        # change of the current log may be committed while an older log still holds one.
        deadline = time.monotonic() + self.s.flush_interval
        while self._old:
            for ref in list(self._old):
                try:
                    await self._drain_log(ref)
                    await self._drop_if_drained(ref)
                except nats.js.errors.NotFoundError:
                    await self._forget(ref)  # another process drained and deleted it
            if self._old:
                if time.monotonic() > deadline:
                    return  # e.g. another process holds old messages: next round
                await asyncio.sleep(0.05)
        await self._drain_log(self._log)
        with contextlib.suppress(Exception):
            await self._refresh()

    async def _drain_log(self, ref: LogRef) -> None:
        size = self.s.batch_size
        puller = self._pullers[ref.name]
        while not self.worker.stopping:
            ci = await self._consumer(ref)
            if not len(puller.batch) and not ci.num_pending:
                break  # nothing held, nothing waiting (others' deliveries are theirs to ack)
            # The batch is what was waiting when the round started (at most batch_size), as
            # the tail delivers it: writes that arrive meanwhile go to the next batch, so that
            # under a steady stream of writes a commit still happens every round.
            goal = min(size, len(puller.batch) + int(ci.num_pending or 0))
            while not await puller.filled(goal, self.s.poll_interval):
                ci = await self._consumer(ref)  # a peer's tail may have taken some
                if not ci.num_pending:
                    break
                goal = min(size, len(puller.batch) + int(ci.num_pending))
            batch = puller.take()
            if not batch:
                break
            try:
                await self._commit(ref, batch)
            except Exception:
                await self._hand_back(batch.replies)  # redelivered now, not after ack_wait
                raise
            self.worker.signal_progress()
            if len(batch) < size:
                break
        await self._purge(ref)

    async def _commit(self, ref: LogRef, batch: Batch) -> None:
        if batch.foreign:
            self.committer.metrics.add("foreign_messages", batch.foreign)
            log.warning("skipped %d messages in %s that msstore did not write", batch.foreign,
                        ref.name)
        replies = batch.replies

        async def keep_alive() -> None:  # the batch stays ours while PostgreSQL is down
            with contextlib.suppress(Exception):
                await _durable.reply_all(self.nc, replies, _durable.IN_PROGRESS)

        self._holding = replies  # close() hands them back if the commit never finishes
        await self.committer.commit(batch.changes(), ref.epoch, self.name,
                                    messages=len(replies), expired=batch.expired(self.s.ttl),
                                    on_retry=keep_alive)
        await _durable.reply_all(self.nc, replies)
        self._holding = []
        # Acks are fire-and-forget publishes: one PING/PONG makes sure the server has them
        # before anyone reads the ack floor. If it fails, the messages are redelivered and
        # replayed as no-ops.
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self.nc.flush(timeout=5)

    async def _purge(self, ref: LogRef) -> None:
        """Drop committed messages from the log: everything below the ack floor (at most once a
        second). The floor's own message stays, so the log's last message always exists.

        Only while no delivery is waiting for its ack: NATS 2.9 forgets a consumer's pending
        acks on any purge (they would then never be redelivered).
        """
        if time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + 1.0
        ci = await self._consumer(ref)
        floor = ci.ack_floor.stream_seq if ci.ack_floor else 0
        if floor > self._purged.get(ref.name, 1) and not ci.num_ack_pending:
            await self.js.purge_stream(ref.name, seq=floor)
            self._purged[ref.name] = floor

    async def _drop_if_drained(self, ref: LogRef) -> None:
        """Delete an old log once nothing is unacked and it has stopped growing for a second
        (the server may still hand it copies it had taken before the log was retired)."""
        if _unacked(await self._consumer(ref)):
            return
        last = (await self.js.stream_info(ref.name)).state.last_seq
        seen = self._settling.get(ref.name)
        if seen is None or seen[0] != last:
            self._settling[ref.name] = (last, time.monotonic())
        elif time.monotonic() - seen[1] >= 1.0:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js.delete_stream(ref.name)
            await self._forget(ref)

    async def _hand_back(self, replies: list[str]) -> None:
        self._holding = []
        with contextlib.suppress(Exception):
            await _durable.reply_all(self.nc, replies, _durable.NAK)

    async def _forget(self, ref: LogRef) -> None:
        self._old = [r for r in self._old if r != ref]
        self._settling.pop(ref.name, None)
        puller = self._pullers.pop(ref.name, None)
        if puller is not None:
            await puller.stop()

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        if self._peers is not None:
            with contextlib.suppress(Exception):
                await self._peers.unsubscribe()
        await super().close()
        for puller in self._pullers.values():
            await puller.stop_requesting()
        # Messages delivered but not committed: a NAK redelivers them now to the next flusher,
        # instead of after ack_wait — including those a still-open pull request delivers.
        late = max((p.open_until for p in self._pullers.values()), default=0.0)
        if late > time.monotonic():
            await asyncio.sleep(min(late - time.monotonic(), self.s.fetch_timeout) + 0.05)
        unflushed, self._holding = self._holding, []
        for puller in self._pullers.values():
            unflushed += puller.take().replies
        if unflushed:
            await self._hand_back(unflushed)
        with contextlib.suppress(Exception):
            await self.nc.flush()
        for puller in self._pullers.values():
            await puller.stop()


__all__ = ["StreamFlusher"]
