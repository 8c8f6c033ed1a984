"""LangGraph's long-term memory on msstore: :class:`MsstoreStore`, a ``BaseStore``.

::

    abatch(ops) ─ checks every op (namespaces, keys, values, filters) before any I/O
      ├─ GetOps            ─▶ one statement for all of them (TTL refresh in the same one)
      ├─ each SearchOp     ─▶ one statement: namespace range, JSONB filters, vector ranking,
      ├─ each ListNamespaces    TTL refresh of the rows returned      (reads run concurrently)
      └─ PutOps (last wins) ─▶ then one statement: upserts, deletes, and their vectors

Design: items are rows of ``langgraph.store_items`` (migration 010) and PostgreSQL is the
only copy. Every operation of a store is a query PostgreSQL answers in one statement —
namespace prefixes (a primary-key range), JSONB filters, the join to the vectors, TTL
refreshes — and a KV tier in front would answer none of them: each search would first wait
for the write-behind, or merge two sources. Long-term memory is written per memory, not per
superstep, so KV's cheaper acknowledgement buys little here (the checkpointer,
:class:`~msstore.integrations.langgraph.MsstoreSaver`, is where it pays). Reads see the state
before the batch's puts (as in LangGraph's InMemoryStore and PostgresStore); the puts of one
batch are one atomic statement, the last op on a (namespace, key) winning.

Semantic search: with ``index=`` (an msstore :class:`~msstore.layers.embedders.Embedder`
such as ``HashingEmbedder()`` / ``MiniLMEmbedder()``, or LangGraph's ``IndexConfig``
``{"dims", "embed", "fields"}``), each put embeds the value's ``fields`` (LangGraph's path
syntax; default ``["$"]``, the whole value as JSON; a put's ``index=[…]`` overrides them,
``index=False`` embeds nothing) into the knowledge base, ``knowledge.documents`` (pgvector),
collection ``langgraph:<name>``, one row per field text, recorded with the embedder's name.
``search(query=…)`` ranks items by their best field's cosine similarity (exact; items without
vectors come last), compared only with vectors of the same embedder and dimension.

TTL (``supports_ttl``): ``put(ttl=minutes)`` or ``TTLConfig.default_ttl``; reads with
``refresh_ttl`` (default ``TTLConfig.refresh_on_read``, True) move the expiry; an expired item
is never returned, whether or not the sweeper (``sweep_interval_minutes``, or
:meth:`MsstoreStore.sweep_ttl`) deleted it yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

import orjson
from langgraph.store.base import (
    GetOp,
    IndexConfig,
    Item,
    ListNamespacesOp,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    TTLConfig,
    ensure_embeddings,
    get_text_at_path,
    tokenize_path,
)

from ..._background import Worker
from ..._check import non_negative_int, positive_int
from ..._managed import Managed
from ..._pg import pg_errors
from ...codec import MAX_VALUE_BYTES
from ...errors import InvalidOptionError, InvalidValueError, StoreError
from ...keys import check_key
from ...layers.embedders import Embedder, embed_texts, embedder_name
from ...layers.vectors import VectorStore, _vector_literal
from . import _store_sql as Q
from ._store_api import CheckedStore
from ._sync import run_sync

if TYPE_CHECKING:
    from ...connection import Connection

DEFAULT_STORE: Final = "langgraph"
_TTL_KEYS = frozenset({"default_ttl", "refresh_on_read", "sweep_interval_minutes",
                       "omit_expired"})


class _Index:
    """What a store embeds (``fields``) and with what (an msstore Embedder or LangChain's)."""

    def __init__(self, index: Embedder | IndexConfig | Mapping[str, Any], offload: bool
                 ) -> None:
        config: Mapping[str, Any] = {"embed": index} if isinstance(index, Embedder) else index
        if not isinstance(config, Mapping) or "embed" not in config:
            raise InvalidOptionError(
                "index must be an msstore Embedder (e.g. HashingEmbedder()) or LangGraph's "
                f"IndexConfig {{'dims', 'embed', 'fields'}}, got {index!r}"[:300])
        embed = config["embed"]
        self._embedder: Embedder | None = embed if isinstance(embed, Embedder) else None
        self.dims = positive_int("index['dims']", config.get(
            "dims", self._embedder.dim if self._embedder else None))
        if self._embedder is not None:
            if self._embedder.dim != self.dims:
                raise InvalidOptionError(f"index['dims'] is {self.dims} but the embedder "
                                         f"makes {self._embedder.dim}-dimensional vectors")
            self.name = embedder_name(self._embedder)
        else:
            try:
                self._lc = ensure_embeddings(embed)
            except (ValueError, ImportError) as e:  # an unknown provider string, no langchain
                raise InvalidOptionError(f"index['embed'] cannot be used: {e}") from e
            model = getattr(embed, "model", None) or getattr(embed, "model_name", None)
            label = embed if isinstance(embed, str) else getattr(
                embed, "__qualname__", type(embed).__qualname__)
            self.name = f"langchain:{label}{f':{model}' if model else ''}/{self.dims}"
        fields = config.get("fields") or ["$"]
        if not isinstance(fields, list | tuple) or not all(
                isinstance(f, str) and f for f in fields):
            raise InvalidOptionError(f"index['fields'] must be a list of field paths (str), "
                                     f"got {fields!r}"[:200])
        self.fields = [(f, f if f == "$" else tokenize_path(f)) for f in fields]
        self._offload = offload

    def texts(self, value: Mapping[str, Any], paths: list[str] | None) -> list[tuple[str, str]]:
        """(field name, text) pairs to embed: one per text a path finds (``path.i`` for
        several)."""
        fields = self.fields if paths is None else [
            (p, p if p == "$" else tokenize_path(p)) for p in paths]
        out = []
        for path, tokens in fields:
            found = get_text_at_path(value, tokens)
            out += [(f"{path}.{i}" if len(found) > 1 else path, t) for i, t in enumerate(found)]
        return out

    async def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        if self._embedder is not None:
            return await embed_texts(self._embedder, texts, offload=self._offload)
        vecs = await self._lc.aembed_documents(texts)
        if len(vecs) != len(texts):
            raise InvalidValueError(f"the embedder returned {len(vecs)} vectors for "
                                    f"{len(texts)} texts")
        return vecs

    async def query_vector(self, query: str) -> str | None:
        """The pgvector literal of a query, None when it has no direction (no words)."""
        if self._embedder is None:
            vec = await self._lc.aembed_query(query)
        else:
            vec = (await self.embed([query]))[0]
        return _vector_literal(vec, self.dims) if any(vec) else None


class MsstoreStore(Managed, CheckedStore):
    """LangGraph's ``BaseStore`` (long-term memory) on msstore's PostgreSQL.

    ::

        async with MsstoreStore(ms, index=HashingEmbedder(), ttl={"default_ttl": 60}) as store:
            graph = builder.compile(checkpointer=saver, store=store)
            await store.aput(("memories", user_id), "m1", {"text": "likes tea"})
            hits = await store.asearch(("memories", user_id), query="drinks")

    ``name`` tells stores sharing a database apart; ``index`` enables ``search(query=…)``
    (see the module docstring); ``ttl`` is LangGraph's ``TTLConfig`` (minutes). Async; the
    sync methods work from threads other than the store's event loop.
    """

    supports_ttl: bool = True
    _usage = "`async with MsstoreStore(ms) as store` or `await MsstoreStore.open(ms)`"

    def __init__(self, ms: Connection, *, name: str = DEFAULT_STORE,
                 index: Embedder | IndexConfig | None = None, ttl: TTLConfig | None = None,
                 offload_embedding: bool = False, max_value_bytes: int = MAX_VALUE_BYTES
                 ) -> None:
        self.ms = ms
        self.name = check_key(name)
        self.collection = f"langgraph:{name}"
        self.index_config = index
        self._index = None if index is None else _Index(index, offload_embedding)
        self.ttl_config = _check_ttl_config(ttl)
        self.max_value_bytes = positive_int("max_value_bytes", max_value_bytes)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: Worker | None = None

    async def _start(self) -> None:
        with pg_errors("look for langgraph.store_items"):
            present = await self.ms.pool.fetchval(
                f"SELECT to_regclass('{Q.ITEMS}') IS NOT NULL")
        if not present:
            raise StoreError(f"{Q.ITEMS} is missing: connect with msstore.connect() (it "
                             "migrates by default) or run `await ms.migrate()` first")
        if self._index is not None:  # says how to get pgvector where it is missing
            await VectorStore.open(self.ms, collection=self.collection)
            with pg_errors("look for the store's vector index"):
                indexed = await self.ms.pool.fetchval(
                    "SELECT to_regclass('knowledge.idx_documents_langgraph_item') IS NOT NULL")
            if not indexed:  # pgvector arrived after migration 010 ran
                raise StoreError("knowledge.idx_documents_langgraph_item is missing (pgvector "
                                 "was installed after migration 010): run the DO block of "
                                 "sql/010_langgraph_store.sql once more (it is idempotent)")
        self._loop = asyncio.get_running_loop()
        minutes = (self.ttl_config or {}).get("sweep_interval_minutes")
        if minutes:
            self._sweeper = Worker(f"langgraph-store-sweeper-{self.name}", self._sweep_step,
                                   interval=float(minutes) * 60, base_backoff=1.0,
                                   max_backoff=60.0)
            self._sweeper.start()

    async def _close(self) -> None:
        if self._sweeper is not None:
            await self._sweeper.stop()

    # ---------------------------------------------------------------- the batch

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """Run LangGraph's ops: reads first (concurrently), then all puts in one statement."""
        self._check_open()
        ops = list(ops)
        results: list[Result] = [None] * len(ops)
        gets: list[tuple[int, GetOp]] = []
        reads: list[Callable[[], Any]] = []
        puts: list[PutOp] = []
        for i, op in enumerate(ops):  # every check before any I/O
            if isinstance(op, GetOp):
                Q.check_namespace(op.namespace)
                Q.check_item_key(op.key)
                gets.append((i, op))
            elif isinstance(op, SearchOp):
                reads.append(self._search_plan(i, op, results))
            elif isinstance(op, ListNamespacesOp):
                reads.append(self._list_plan(i, op, results))
            elif isinstance(op, PutOp):
                puts.append(op)
            else:
                raise InvalidValueError(f"unknown store operation {type(op).__name__}; "
                                        "MsstoreStore runs GetOp, PutOp, SearchOp and "
                                        "ListNamespacesOp")
        write = self._put_plan(puts) if puts else None
        if gets:
            reads.append(lambda: self._get(gets, results))
        await asyncio.gather(*(read() for read in reads))
        if write is not None:
            await write()
        return results

    async def _get(self, gets: list[tuple[int, GetOp]], results: list[Result]) -> None:
        want: dict[tuple[str, str], bool] = {}
        for _, op in gets:
            where = (Q.ns_text(op.namespace), op.key)
            want[where] = want.get(where, False) or bool(op.refresh_ttl)
        with pg_errors(f"get {len(want)} store item(s)"):
            rows = await self.ms.pool.fetch(Q.GET_SQL, self.name, [w[0] for w in want],
                                            [w[1] for w in want], list(want.values()))
        found = {(r["namespace"], r["key"]): r for r in rows}
        for i, op in gets:
            row = found.get((Q.ns_text(op.namespace), op.key))
            results[i] = None if row is None else Item(
                value=row["value"], key=row["key"], namespace=Q.ns_tuple(row["namespace"]),
                created_at=row["created_at"], updated_at=row["updated_at"])

    def _search_plan(self, i: int, op: SearchOp, results: list[Result]
                     ) -> Callable[[], Any]:
        prefix = Q.check_namespace(op.namespace_prefix, item=False, what="namespace_prefix")
        p = Q.Params(self.name)
        where = [Q.prefix_condition(prefix, p),
                 *Q.filter_conditions(op.filter, p, self.max_value_bytes)]
        limit = p.add(non_negative_int("limit", op.limit))
        offset = p.add(non_negative_int("offset", op.offset))
        refresh = p.add(bool(op.refresh_ttl)) + "::bool"
        score, join, slot = "NULL::float8", "", None
        if op.query is not None and self._index is not None:
            if not isinstance(op.query, str):
                raise InvalidValueError(f"query must be a str, got {type(op.query).__name__}")
            slot = len(p.values)
            score, join = "sc.score", Q.SCORED_SQL.format(
                q=p.add(None), dim=self._index.dims, collection=p.add(self.collection),
                embedder=p.add(self._index.name))
        sql = Q.SEARCH_SQL.format(score=score, join=join, where=" AND ".join(where), limit=limit,
                                  offset=offset, refresh=refresh)

        async def run() -> None:
            if slot is not None and self._index is not None:  # NULL: every score NULL
                p.values[slot] = await self._index.query_vector(str(op.query))
            with pg_errors(f"search the store under {prefix!r}"):
                rows = await self.ms.pool.fetch(sql, *p.values)
            results[i] = [SearchItem(
                namespace=Q.ns_tuple(r["namespace"]), key=r["key"], value=r["value"],
                created_at=r["created_at"], updated_at=r["updated_at"],
                score=None if r["score"] is None else float(r["score"])) for r in rows]
        return run

    def _list_plan(self, i: int, op: ListNamespacesOp, results: list[Result]
                   ) -> Callable[[], Any]:
        p = Q.Params(self.name)
        where = Q.match_conditions(op.match_conditions, p) or ["TRUE"]
        depth = p.add(None if op.max_depth is None else positive_int("max_depth",
                                                                       op.max_depth))
        sql = Q.LIST_SQL.format(depth=depth, where=" AND ".join(where),
                                limit=p.add(non_negative_int("limit", op.limit)),
                                offset=p.add(non_negative_int("offset", op.offset)))

        async def run() -> None:
            with pg_errors("list the store's namespaces"):
                rows = await self.ms.pool.fetch(sql, *p.values)
            results[i] = [tuple(r["ns"]) for r in rows]
        return run

    def _put_plan(self, ops: list[PutOp]) -> Callable[[], Any]:
        last: dict[tuple[tuple[str, ...], str], PutOp] = {}
        for op in ops:
            ns = Q.check_namespace(op.namespace, write=op.value is not None)
            last[(ns, Q.check_item_key(op.key))] = op
        up: list[tuple[str, str, orjson.Fragment, float | None]] = []
        gone: list[tuple[str, str]] = []
        embed: list[tuple[str, str, Mapping[str, Any], list[str] | None]] = []
        for (ns, key), op in last.items():
            if op.value is None:
                gone.append((Q.ns_text(ns), key))
                continue
            up.append((Q.ns_text(ns), key, Q.encode_value(op.value, self.max_value_bytes),
                       Q.check_minutes("ttl", op.ttl)))
            paths = Q.check_index_paths(op.index)
            if self._index is not None and paths is not False:
                embed.append((Q.ns_text(ns), key, op.value, paths))

        async def run() -> None:
            args: list[Any] = [self.name, [u[0] for u in up], [u[1] for u in up],
                               [u[2] for u in up], [u[3] for u in up],
                               [g[0] for g in gone], [g[1] for g in gone]]
            vectors = ""
            if self._index is not None:
                vectors = Q.PUT_VECTORS_SQL
                args += [self.collection, *await self._documents(embed), self._index.name]
            with pg_errors(f"write {len(up)} and delete {len(gone)} store item(s)"):
                await self.ms.pool.execute(Q.PUT_SQL.format(vectors=vectors), *args)
        return run

    async def _documents(self, embed: list[tuple[str, str, Mapping[str, Any], list[str] | None]]
                         ) -> list[list[Any]]:
        """The knowledge-base rows of the items to embed: keys, texts, values, vectors."""
        assert self._index is not None
        docs = [(ns, key, field, text) for ns, key, value, paths in embed
                for field, text in self._index.texts(value, paths)]
        vectors = await self._index.embed([d[3] for d in docs])
        kept = [(d, v) for d, v in zip(docs, vectors, strict=True) if any(v)]  # no words
        return [[orjson.dumps([d[0], d[1], d[2]]).decode() for d, _ in kept],
                [d[3] for d, _ in kept],
                [orjson.Fragment(orjson.dumps({"ns": d[0], "key": d[1], "field": d[2]}))
                 for d, _ in kept],
                [_vector_literal(v, self._index.dims) for _, v in kept]]

    # ---------------------------------------------------------------- TTL

    async def sweep_ttl(self) -> int:
        """Delete the expired items (and their vectors) now; return how many."""
        self._check_open()
        return await self._sweep()

    async def _sweep_step(self) -> None:
        await self._sweep()

    async def _sweep(self) -> int:
        vectors = Q.SWEEP_VECTORS_SQL if self._index is not None else ""
        args = [self.name] + ([self.collection] if vectors else [])
        with pg_errors("sweep expired store items"):
            n: int = await self.ms.pool.fetchval(Q.SWEEP_SQL.format(vectors=vectors), *args)
        return n

    # ---------------------------------------------------------------- sync

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """The sync batch (every sync method): :meth:`abatch` on the store's loop."""
        ops = list(ops)
        return run_sync(self._loop, lambda: self.abatch(ops), "MsstoreStore",
                        "use the async methods (aget, aput, asearch, …)")


def _check_ttl_config(ttl: object) -> TTLConfig | None:
    if ttl is None:
        return None
    if not isinstance(ttl, Mapping) or set(ttl) - _TTL_KEYS:
        raise InvalidOptionError(f"ttl must be LangGraph's TTLConfig (keys "
                                 f"{sorted(_TTL_KEYS)}), got {ttl!r}"[:300])
    Q.check_minutes("ttl['default_ttl']", ttl.get("default_ttl"))
    Q.check_minutes("ttl['sweep_interval_minutes']", ttl.get("sweep_interval_minutes"))
    for flag in ("refresh_on_read", "omit_expired"):
        if not isinstance(ttl.get(flag, True), bool):
            raise InvalidOptionError(f"ttl[{flag!r}] must be a bool, got {ttl[flag]!r}")
    return TTLConfig(**ttl)  # type: ignore[typeddict-item]


__all__ = ["DEFAULT_STORE", "MsstoreStore"]
