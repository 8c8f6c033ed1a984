"""A LangGraph checkpointer on msstore: KV-acknowledged supersteps, PostgreSQL behind them.

::

    aput ──▶ heads bucket: compare-and-set of the namespace's newest id
               │ lost ──▶ CheckpointConflictError (nothing written)
               │ won
               ▼
             HybridStateManager.write_state: new channel blobs, then the checkpoint document
               │ KV ack: aput returns           (no superstep waits for PostgreSQL)
               ▼
             stream flusher ──▶ agents.state rows (JSONB), batched behind the writers

    aget_tuple / alist ──▶ KV (a subject-filtered watch, then reads) ∪ agents.state keys
                           whose KV copy expired ──▶ read-your-writes before any flush

The key layout is :mod:`._layout`'s. Concurrency: a checkpointer may extend a thread's
namespace only from the newest checkpoint it has seen there (read with ``aget_tuple`` or
written itself); when another writer extended it since, ``aput`` writes nothing and raises
:class:`~msstore.errors.CheckpointConflictError`, so two processes on one thread never fork
its history silently. A fork on purpose (time travel: resuming from an older checkpoint you
just read) is allowed.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, TypeVar

import nats.js.errors
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
    get_checkpoint_metadata,
)
from langgraph.checkpoint.serde.base import SerializerProtocol
from nats.js.kv import KeyValue

from ..._check import positive_int, positive_seconds
from ..._managed import Managed
from ..._nats import kv_prefix
from ..._publish import kv_update
from ...errors import CheckpointConflictError, InvalidOptionError
from ...hybrid import HybridStateManager
from ...kv import DEFAULT_TTL_SECONDS, check_bucket_name, ensure_bucket, nats_errors
from . import _layout as L
from ._retention import let_go
from ._scan import Found, kv_entries, scan
from ._sync import run_sync

if TYPE_CHECKING:
    from ...connection import Connection

DEFAULT_BUCKET: Final = "langgraph_checkpoints"
PRUNE_STRATEGIES: Final = ("keep_latest", "delete")
T = TypeVar("T")


class MsstoreSaver(Managed, BaseCheckpointSaver[str]):
    """LangGraph's ``BaseCheckpointSaver`` on msstore (async; the sync methods from other threads).

    ::

        async with MsstoreSaver(ms) as saver:
            graph = builder.compile(checkpointer=saver)
            await graph.ainvoke(inputs, {"configurable": {"thread_id": "t-1"}})

    ``bucket`` names the KV bucket (and ``<bucket>_heads``, the compare-and-set of each
    namespace's newest checkpoint); ``ttl`` is its KV max age (PostgreSQL keeps everything
    until deleted); ``serde`` is LangGraph's serializer (its default when None).

    Retention (off by default, as in LangGraph's savers): ``keep_last`` keeps the newest N
    checkpoints of each namespace, ``max_age`` (seconds) lets go of older ones — the newest is
    always kept. It runs inside ``aput`` once every ``keep_last`` (else 10) checkpoints of a
    namespace, so a thread stays bounded at an amortised cost. The other options go to the
    :class:`~msstore.HybridStateManager` that does the writing.
    """

    _usage = "`async with MsstoreSaver(ms) as saver` or `await MsstoreSaver.open(ms)`"

    def __init__(self, ms: Connection, *, bucket: str = DEFAULT_BUCKET,
                 serde: SerializerProtocol | None = None, ttl: float = DEFAULT_TTL_SECONDS,
                 replicas: int | None = None, flush_interval: float = 1.0,
                 flush_threshold: int = 50, close_timeout: float | None = 30.0,
                 keep_last: int | None = None, max_age: float | None = None) -> None:
        BaseCheckpointSaver.__init__(self, serde=serde)
        self.keep_last = None if keep_last is None else positive_int("keep_last", keep_last)
        self.max_age = None if max_age is None else positive_seconds("max_age", max_age)
        self.ms = ms
        self.bucket = check_bucket_name(bucket)
        self.heads_bucket = check_bucket_name(f"{bucket}_heads")
        # the stream flusher: its durability log copies every write of the bucket
        self.hsm = HybridStateManager(ms, bucket=bucket, flusher="stream", ttl=ttl,
                                      replicas=replicas, flush_interval=flush_interval,
                                      flush_threshold=flush_threshold,
                                      close_timeout=close_timeout)
        self._ttl, self._replicas = ttl, replicas
        self._heads: KeyValue | None = None
        self._heads_prefix = kv_prefix(self.heads_bucket)
        #: the heads-bucket revision this saver last saw per namespace (0: none existed)
        self._seen: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        #: aput calls per namespace since its retention last ran (see :meth:`_retain`)
        self._since_retained: dict[str, int] = {}

    async def _start(self) -> None:
        await self.hsm.start()
        with nats_errors(f"open KV bucket {self.heads_bucket!r}"):
            self._heads = await ensure_bucket(self.ms.js, self.heads_bucket, ttl=self._ttl,
                                              replicas=self._replicas)
        self._loop = asyncio.get_running_loop()

    async def _close(self) -> None:
        await self.hsm.close()

    async def flush(self) -> None:
        """Wait until every checkpoint and write acknowledged so far is in PostgreSQL."""
        self._check_open()
        await self.hsm.flush()

    def _agent(self, thread_id: object) -> uuid.UUID:
        return L.thread_agent(self.bucket, str(thread_id))

    # ---------------------------------------------------------------- heads (concurrency)

    async def _head(self, key: str) -> tuple[str | None, int]:
        """(newest checkpoint id, revision) of a namespace in the heads bucket; (None, 0)."""
        assert self._heads is not None
        with nats_errors("read a thread's head"):
            try:
                entry = await self._heads.get(key)
            except nats.js.errors.KeyNotFoundError:
                return None, 0
        return (entry.value or b"").decode() or None, entry.revision or 0

    async def _advance_head(self, thread_id: str, agent: uuid.UUID, ns: str,
                            checkpoint_id: str) -> None:
        """Compare-and-set the namespace's head to ``checkpoint_id`` from the one last seen."""
        assert self._heads is not None
        key = L.head_key(agent, ns)
        expected = self._seen.get(key)
        if expected is None:  # never seen here: extend whatever is newest now
            expected = (await self._head(key))[1]
        try:
            with nats_errors(f"advance thread {thread_id!r}"):
                if expected == 0:  # nats-py's create also steps over a delete marker
                    revision = await self._heads.create(key, checkpoint_id.encode())
                else:  # the hot path
                    revision = await kv_update(self.ms.nc, self._heads_prefix + key,
                                               checkpoint_id.encode(), last=expected)
        except nats.js.errors.KeyValueError as e:  # wrong last sequence: someone else wrote
            head, _ = await self._head(key)
            self._seen.pop(key, None)
            raise CheckpointConflictError(
                f"thread {thread_id!r} namespace {ns!r} was extended by another writer (its "
                f"newest checkpoint is now {head!r}) since this saver last saw it; checkpoint "
                f"{checkpoint_id!r} was not written. Read the thread again (aget_tuple) and "
                "retry, or keep one writer per thread") from e
        self._seen[key] = revision

    # ---------------------------------------------------------------- writes

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata, new_versions: ChannelVersions
                   ) -> RunnableConfig:
        """Store a checkpoint (new channel values once each, small ones inline); return its
        config at KV's ack."""
        self._check_open()
        conf = config["configurable"]
        thread_id, ns = str(conf["thread_id"]), str(conf.get("checkpoint_ns", ""))
        agent, cid = self._agent(thread_id), checkpoint["id"]
        values = checkpoint["channel_values"]
        inline = {ch: v for ch, v in values.items() if L.inline(v)}
        # the compare-and-set and the new blobs at once: a blob's key names its version, so
        # one written for a checkpoint that then lost the race is never read
        done = await asyncio.gather(
            self._advance_head(thread_id, agent, ns, cid),
            *(self.hsm.write_state(agent, L.blob_key(ns, channel, version),
                                   L.pack(self.serde, values[channel]) if channel in values
                                   else L.EMPTY)
              for channel, version in new_versions.items() if channel not in inline),
            return_exceptions=True)
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
        md = get_checkpoint_metadata(config, metadata)
        doc = {"lg": "checkpoint", "bucket": self.bucket, "thread_id": thread_id,
               "checkpoint_ns": ns, "checkpoint_id": cid,
               "parent_checkpoint_id": conf.get("checkpoint_id"), "run_id": md.get("run_id"),
               "ts": checkpoint.get("ts"),
               "checkpoint": L.pack(self.serde, {**checkpoint, "channel_values": inline}),
               **L.metadata_fields(self.serde, dict(md))}
        await self.hsm.write_state(agent, L.checkpoint_key(ns, cid), doc)
        await self._retain(agent, L.head_key(agent, ns))
        return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                                 "checkpoint_id": cid}}

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        """Store one call's pending writes as one key, named by its first index: a retried
        task rewrites the key, never adds; LangGraph's special writes (negative indexes, one
        per call) replace the previous one."""
        self._check_open()
        if not writes:
            return
        conf = config["configurable"]
        ns, cid = str(conf.get("checkpoint_ns", "")), str(conf["checkpoint_id"])
        agent = self._agent(conf["thread_id"])
        first = WRITES_IDX_MAP.get(writes[0][0], 0)
        items = [{"channel": channel, "idx": WRITES_IDX_MAP.get(channel, idx),
                  **L.pack(self.serde, value)} for idx, (channel, value) in enumerate(writes)]
        await self.hsm.write_state(
            agent, L.write_key(ns, cid, task_id, first),
            {"task_id": task_id, "task_path": task_path, "writes": items})

    # ---------------------------------------------------------------- reads

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint named by ``checkpoint_id``, else the namespace's newest; None if none."""
        self._check_open()
        conf = config["configurable"]
        thread_id, ns = str(conf["thread_id"]), str(conf.get("checkpoint_ns", ""))
        agent, cid = self._agent(thread_id), get_checkpoint_id(config)
        head_key = L.head_key(agent, ns)
        head, revision = await self._head(head_key)
        self._seen[head_key] = revision  # the newest this saver has seen: aput extends it
        doc = None
        for wanted in ([cid] if cid else [head] if head else []):
            doc = await self.hsm.read_state(agent, L.checkpoint_key(ns, wanted), default=None)
        if doc is None and not cid:  # no head (expired, pruned): the newest id listed
            docs = await scan(self.hsm, agent, L.checkpoint_prefix(ns))
            doc = max(docs.values(), key=lambda d: d["checkpoint_id"], default=None)
        return None if doc is None else await self._tuple(agent, doc)

    async def alist(self, config: RunnableConfig | None, *,
                    filter: dict[str, Any] | None = None, before: RunnableConfig | None = None,
                    limit: int | None = None) -> AsyncIterator[CheckpointTuple]:
        """Checkpoints newest first: of the thread (and namespace, if given) or of all threads."""
        self._check_open()
        conf = (config or {}).get("configurable", {})
        if "thread_id" in conf:
            agent: uuid.UUID | None = self._agent(conf["thread_id"])
            prefix = L.checkpoint_prefix(conf.get("checkpoint_ns"))
            found = await scan(self.hsm, agent, prefix)
        else:
            found = await scan(self.hsm, None, L.checkpoint_prefix(),
                               {"lg": "checkpoint", "bucket": self.bucket})
        before_id = get_checkpoint_id(before) if before else None
        wanted = conf.get("checkpoint_id")
        docs = sorted(found.items(), key=lambda kv: kv[1]["checkpoint_id"], reverse=True)
        count = 0
        for (owner, _), doc in docs:
            if limit is not None and count >= limit:
                return
            if (before_id and doc["checkpoint_id"] >= before_id) or (
                    wanted and doc["checkpoint_id"] != wanted):
                continue
            md = L.metadata_of(self.serde, doc)
            if filter and any(md.get(k) != v for k, v in filter.items()):
                continue
            count += 1
            yield await self._tuple(owner, doc, md)

    async def _tuple(self, agent: uuid.UUID, doc: dict[str, Any],
                     metadata: dict[str, Any] | None = None) -> CheckpointTuple:
        """A stored document as LangGraph's tuple: channel values from their blobs, writes."""
        ns, cid = doc["checkpoint_ns"], doc["checkpoint_id"]
        checkpoint = L.unpack(self.serde, doc["checkpoint"])
        inline = checkpoint.get("channel_values") or {}
        versions = [(ch, v) for ch, v in checkpoint["channel_versions"].items()
                    if ch not in inline]
        blobs, writes = await asyncio.gather(
            asyncio.gather(*(self.hsm.read_state(agent, L.blob_key(ns, ch, v), default=None)
                             for ch, v in versions)),
            scan(self.hsm, agent, L.writes_prefix(ns, cid)))
        checkpoint["channel_values"] = {**inline, **{
            ch: L.unpack(self.serde, blob) for (ch, _), blob in zip(versions, blobs, strict=True)
            if blob is not None and blob.get("t") != "empty"}}
        pending = sorted(L.flat_writes(writes.values()),
                         key=lambda w: (w["task_path"], w["task_id"], w["idx"]))
        conf = {"thread_id": doc["thread_id"], "checkpoint_ns": ns}
        parent = doc.get("parent_checkpoint_id")
        return CheckpointTuple(
            config={"configurable": {**conf, "checkpoint_id": cid}},
            checkpoint=checkpoint,
            metadata=metadata if metadata is not None else L.metadata_of(self.serde, doc),  # type: ignore[arg-type]
            parent_config={"configurable": {**conf, "checkpoint_id": parent}} if parent else None,
            pending_writes=[(w["task_id"], w["channel"], L.unpack(self.serde, w))
                            for w in pending])

    # ---------------------------------------------------------------- deletes and copies

    async def _remove(self, found: Found | set[tuple[uuid.UUID, str]]) -> None:
        await asyncio.gather(*(self.hsm.remove_state(agent, key) for agent, key in found))

    async def _drop_heads(self, agent: uuid.UUID, ns: str | None = None) -> None:
        """Forget a thread's heads (all namespaces, or one): the next aput starts afresh."""
        assert self._heads is not None
        keys = [L.head_key(agent, ns)] if ns is not None else [
            k for k, v in (await kv_entries(self.ms.js, self._heads, self.heads_bucket,
                                     f"{agent}.>")).items() if v is not None]
        with nats_errors("delete a thread's heads"):
            for key in keys:
                await self._heads.delete(key)
                self._seen.pop(key, None)

    async def adelete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint, blob and write of the thread (KV now, PostgreSQL behind)."""
        self._check_open()
        agent = self._agent(thread_id)
        await self._remove(await scan(self.hsm, agent, ""))
        await self._drop_heads(agent)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint, blob and write of one thread to another."""
        self._check_open()
        assert self._heads is not None
        src, dst = self._agent(source_thread_id), self._agent(target_thread_id)
        found = await scan(self.hsm, src, "")
        newest: dict[str, str] = {}
        for (_, key), value in found.items():
            if key.startswith("cp."):
                value = {**value, "thread_id": str(target_thread_id)}
                ns, cid = value["checkpoint_ns"], value["checkpoint_id"]
                newest[ns] = max(newest.get(ns, cid), cid)
        await asyncio.gather(*(
            self.hsm.write_state(dst, key, {**value, "thread_id": str(target_thread_id)}
                                 if key.startswith("cp.") else value)
            for (_, key), value in found.items()))
        with nats_errors(f"set the heads of thread {target_thread_id!r}"):
            for ns, cid in newest.items():
                key = L.head_key(dst, ns)
                self._seen[key] = await self._heads.put(key, cid.encode())

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints (and their writes) of these runs, in every thread.

        Searches PostgreSQL's JSONB, so it first waits for the write-behind (``flush``).
        """
        self._check_open()
        if not run_ids:
            return
        await self.hsm.flush()
        for run_id in run_ids:
            found = await scan(self.hsm, None, L.checkpoint_prefix(),
                               {"lg": "checkpoint", "bucket": self.bucket, "run_id": run_id})
            for (agent, key), doc in found.items():
                ns, cid = doc["checkpoint_ns"], doc["checkpoint_id"]
                writes = await scan(self.hsm, agent, L.writes_prefix(ns, cid))
                await self._remove({(agent, key), *writes})
                if (await self._head(L.head_key(agent, ns)))[0] == cid:
                    await self._drop_heads(agent, ns)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """``keep_latest``: keep each namespace's newest checkpoint, its writes and the blobs it
        uses, delete the rest; ``delete``: delete the threads."""
        self._check_open()
        if strategy not in PRUNE_STRATEGIES:
            raise InvalidOptionError(
                f"prune strategy must be one of {PRUNE_STRATEGIES}, got {strategy!r}")
        for thread_id in thread_ids:
            if strategy == "delete":
                await self.adelete_thread(thread_id)
                continue
            agent = self._agent(thread_id)
            found = await scan(self.hsm, agent, "")
            await self._remove(let_go(found, self.serde, keep_last=1))

    async def _retain(self, agent: uuid.UUID, head_key: str) -> None:
        """Apply ``keep_last``/``max_age`` to the thread, once every so many checkpoints."""
        if self.keep_last is None and self.max_age is None:
            return
        since = self._since_retained[head_key] = self._since_retained.get(head_key, 0) + 1
        if since < (self.keep_last or 10):
            return
        self._since_retained[head_key] = 0
        cutoff = None if self.max_age is None else (
            datetime.now(UTC) - timedelta(seconds=self.max_age))
        found = await scan(self.hsm, agent, "")
        await self._remove(let_go(found, self.serde, keep_last=self.keep_last or len(found),
                                  older_than=cutoff))

    # ---------------------------------------------------------------- versions, sync

    def get_next_version(self, current: str | None, channel: None) -> str:
        """LangGraph's string versions: a counter (sortable) and a random tie-breaker."""
        if current is None:
            current_v = 0
        elif isinstance(current, int):
            current_v = current
        else:
            current_v = int(current.split(".")[0])
        return f"{current_v + 1:032}.{random.random():016}"

    def _sync(self, call: Callable[[], Awaitable[T]]) -> T:
        return run_sync(self._loop, call, "MsstoreSaver",
                        "use the graph's async methods (ainvoke, astream, aget_state)")

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._sync(lambda: self.aget_tuple(config))

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None, limit: int | None = None
             ) -> Iterator[CheckpointTuple]:
        async def collect() -> list[CheckpointTuple]:
            return [t async for t in self.alist(config, filter=filter, before=before,
                                                limit=limit)]

        return iter(self._sync(collect))

    def put(self, config: RunnableConfig, checkpoint: Checkpoint,
            metadata: CheckpointMetadata, new_versions: ChannelVersions) -> RunnableConfig:
        return self._sync(lambda: self.aput(config, checkpoint, metadata, new_versions))

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                   task_id: str, task_path: str = "") -> None:
        self._sync(lambda: self.aput_writes(config, writes, task_id, task_path))

    def delete_thread(self, thread_id: str) -> None:
        self._sync(lambda: self.adelete_thread(thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._sync(lambda: self.adelete_for_runs(run_ids))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._sync(lambda: self.acopy_thread(source_thread_id, target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._sync(lambda: self.aprune(thread_ids, strategy=strategy))


__all__ = ["DEFAULT_BUCKET", "PRUNE_STRATEGIES", "MsstoreSaver"]
