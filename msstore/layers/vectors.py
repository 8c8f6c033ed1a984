"""VECTOR_STORE: KNOWLEDGE_BASE in ``knowledge.documents`` (pgvector embeddings, JSONB values).

Search by vector (HNSW, migration 009, or exact), with JSONB filters in the same statement,
and hybrid search (vector + PostgreSQL full text, reciprocal rank fusion). Needs pgvector >= 0.8
(iterative index scans): the embedded server and docker-compose's pgvector image have it.
Embedders live in :mod:`msstore.layers.embedders`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from .._check import positive_int
from .._credentials import redact
from .._pg import pg_errors
from ..codec import MAX_VALUE_BYTES
from ..errors import (
    InvalidOptionError,
    InvalidValueError,
    NotFoundError,
    StoreUnavailableError,
)
from ..keys import check_key
from ..router import Hit
from ._common import as_pairs, check_limit
from .embedders import WORD_RE, Embedder, HashingEmbedder, embed_texts, embedder_name
from .sql import check_pool, jsonb

if TYPE_CHECKING:
    from ..connection import Connection


class _LayerMissing(StoreUnavailableError):
    """The server lacks what a layer needs (pgvector): the Store keeps its other layers."""


def _check_embedder(embedder: object) -> Embedder:
    if embedder is None:
        return HashingEmbedder()
    if not isinstance(embedder, Embedder):
        raise InvalidOptionError(f"embedder must have a dim and an embed(texts) method "
                                 f"(msstore.Embedder), got {type(embedder).__name__}")
    dim = embedder.dim  # it reaches SQL text (``vector(N)`` casts): an int, nothing else
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
        raise InvalidOptionError(f"embedder.dim must be an int from 1 to {MAX_DIM} (pgvector's "
                                 f"limit), got {dim!r}")
    return embedder


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidOptionError(f"{name} must be a bool, got {value!r}")
    return value


def _vector_literal(vec: Sequence[float], dim: int) -> str:
    if len(vec) != dim or not all(math.isfinite(x) for x in vec):
        raise InvalidValueError(f"the embedder returned a vector of length {len(vec)} (or with "
                                f"non-finite numbers); its dim says {dim}")
    return "[" + ",".join(repr(float(x)) for x in vec) + "]"


_UPSERT_DOCS = """
INSERT INTO knowledge.documents AS d (collection, key, content, value, embedding, embedder)
SELECT $1, t.key, t.content, t.value, t.embedding::vector, $6
FROM unnest($2::text[], $3::text[], $4::jsonb[], $5::text[]) AS t(key, content, value, embedding)
ON CONFLICT (collection, key) DO UPDATE SET
    content = excluded.content, value = excluded.value, embedding = excluded.embedding,
    embedder = excluded.embedder, updated_at = now()
"""

#: The rows a query may be compared with: this collection, this embedder (or not recorded,
#: rows from before migration 009) and this dimension (a literal, so that the planner can match
#: the partial HNSW index of 009), then the JSONB metadata filter ($4, NULL for none).
_ROWS = """collection = $1 AND vector_dims(embedding) = {dim}
    AND (embedder = $5 OR embedder IS NULL) AND ($4::jsonb IS NULL OR value @> $4::jsonb)"""

#: The query vector is a scalar subquery, evaluated once per statement: a bare
#: ``$2::text::vector`` would be parsed again for every row an exact scan compares (20x slower).
#: Ordered by the index expression of 009 (``embedding::vector(N)``): pgvector walks the HNSW
#: graph; ``embedding`` uncast matches no index, so the same query is an exact scan (which
#: breaks ties by key; an index scan cannot, a second sort key would hide the index).
_SEARCH_DOCS = """
SELECT key, value, 1 - ({col} <=> (SELECT $2::text::vector({dim}))) AS score
FROM knowledge.documents
WHERE {rows}
ORDER BY {col} <=> (SELECT $2::text::vector({dim})){tiebreak}
LIMIT $3
"""

#: Hybrid search in one statement: the ``$6`` best by vector distance and the ``$6`` best by
#: full-text rank (``websearch_to_tsquery`` on ``$7``), fused by reciprocal rank:
#: score = sum over both lists of 1 / (k + rank), k = ``$8``; a row in one list only gets
#: that list's term. Both halves obey the same filters.
_HYBRID_DOCS = """
WITH vec AS (
    SELECT key, row_number() OVER (ORDER BY dist, key) AS r FROM (
        SELECT key, {col} <=> (SELECT $2::text::vector({dim})) AS dist FROM knowledge.documents
        WHERE {rows} ORDER BY dist LIMIT $6) v
), txt AS (
    SELECT key, row_number() OVER (ORDER BY rank DESC, key) AS r FROM (
        SELECT key, ts_rank_cd(tsv, q) AS rank
        FROM knowledge.documents, websearch_to_tsquery('english', $7) AS q
        WHERE {rows} AND tsv @@ q ORDER BY rank DESC LIMIT $6) t
), fused AS (
    SELECT key, coalesce(1.0 / ($8 + vec.r), 0) + coalesce(1.0 / ($8 + txt.r), 0) AS score
    FROM vec FULL JOIN txt USING (key)
)
SELECT d.key, d.value, f.score::float8 AS score
FROM fused f JOIN knowledge.documents d ON d.collection = $1 AND d.key = f.key
ORDER BY f.score DESC, d.key
LIMIT $3
"""

_EMBEDDERS = """
SELECT coalesce(embedder, '(not recorded)') AS embedder, count(*) AS n
FROM knowledge.documents WHERE collection = $1 GROUP BY 1 ORDER BY 1
"""

#: Dimensions with an HNSW index (sql/009_knowledge_hnsw.sql): the two shipped embedders'.
HNSW_DIMS = frozenset({256, 384})
#: pgvector's largest vector dimension.
MAX_DIM = 16_000

#: Per-search settings: the candidate list, and iterative scans so that a filter that rejects
#: most of the first candidates still gets ``limit`` rows (pgvector >= 0.8), in true order.
_HNSW_SETTINGS = ("SELECT set_config('hnsw.ef_search', $1, true), "
                  "set_config('hnsw.iterative_scan', 'strict_order', true)")


def pgvector_missing_message(server: str) -> str:
    """What to tell a user whose PostgreSQL has no pgvector, and how to get it."""
    return (
        f"the pgvector extension is missing on the PostgreSQL server {server}, so "
        "KNOWLEDGE_BASE (the vector store) is unavailable there. Use the embedded server "
        "(unset MSSTORE_DATABASE_URL: msstore starts PostgreSQL 18 with pgvector), or the "
        "pgvector Docker image (`docker compose up`: pgvector/pgvector:pg15), or install "
        "pgvector on that server (https://github.com/pgvector/pgvector#installation)"
    )


class VectorStore:
    """KNOWLEDGE_BASE in ``knowledge.documents``: pgvector embeddings, JSONB values.

    A value is a ``str`` (the text) or a mapping with a ``"text"`` str; the whole value is
    kept as JSONB (its other fields are the metadata, filterable with ``where=``) and the
    text is embedded. Each row records the embedder's name (:attr:`embedder_name`); a query
    is compared only with rows of its own embedder and dimension.

    ``search(text)`` ranks by cosine similarity, best first. For 256- and 384-dimensional
    embedders (the shipped ones) it walks the HNSW index of migration 009, approximately:
    ``ef_search`` (default 100) is its candidate list, the recall-versus-latency knob;
    ``exact=True`` scans every row instead. ``hybrid_search`` adds PostgreSQL full-text
    ranking and fuses both rankings by reciprocal rank. A query with no words returns no hits.

        query --embed--> vector --+-- ORDER BY embedding::vector(N) <=> q  (HNSW, ef_search)
                                  |     WHERE collection, embedder, where= (iterative scan)
        query --websearch_to_tsquery-- tsv @@ q ORDER BY ts_rank_cd  (GIN)
                                  +--> hybrid: 1/(k + rank_vec) + 1/(k + rank_text)
    """

    def __init__(self, pool: asyncpg.Pool, *, collection: str = "knowledge_base",
                 embedder: Embedder | None = None, offload_embedding: bool = False,
                 max_value_bytes: int = MAX_VALUE_BYTES, ef_search: int = 100) -> None:
        self._pool = check_pool(pool)
        self.collection = check_key(collection)
        self.embedder: Embedder = _check_embedder(embedder)
        self.offload_embedding = _check_bool("offload_embedding", offload_embedding)
        self.max_value_bytes = positive_int("max_value_bytes", max_value_bytes)
        self.ef_search = positive_int("ef_search", ef_search)
        if self.ef_search > 1000:  # pgvector's own bound
            raise InvalidOptionError(f"ef_search must be at most 1000, got {ef_search}")

    @property
    def embedder_name(self) -> str:
        """The name recorded on every row this store writes (``hashing-256``, the model's)."""
        return embedder_name(self.embedder)

    @property
    def indexed(self) -> bool:
        """Whether searches can use an HNSW index (the embedder's dim has one, migration 009)."""
        return self.embedder.dim in HNSW_DIMS

    @classmethod
    async def open(cls, ms: Connection, *, collection: str = "knowledge_base",
                   embedder: Embedder | None = None, offload_embedding: bool = False,
                   ef_search: int = 100) -> VectorStore:
        """Check that pgvector and the table exist; raise StoreUnavailableError saying how."""
        check_key(collection)
        _check_embedder(embedder)
        _check_bool("offload_embedding", offload_embedding)
        positive_int("ef_search", ef_search)
        with pg_errors("checking for pgvector"):
            row = await ms.pool.fetchrow(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') AS ext, "
                "EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector') AS avail,"
                " to_regclass('knowledge.documents') IS NOT NULL AS tbl, "
                "current_setting('server_version') AS version")
        assert row is not None
        server = f"{redact(ms.database_url)} (PostgreSQL {row['version']})"
        if not row["avail"]:
            raise _LayerMissing(pgvector_missing_message(server))
        if not (row["ext"] and row["tbl"]):
            raise _LayerMissing(
                f"pgvector is available on {server} but knowledge.documents is missing: the "
                "database was migrated before pgvector was installed. Run the DO blocks of "
                "sql/003_knowledge_base.sql and sql/009_knowledge_hnsw.sql once more (both "
                "are idempotent), e.g. with psql -f"
            )
        return cls(ms.pool, collection=collection, embedder=embedder,
                   offload_embedding=offload_embedding, ef_search=ef_search)

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        return await embed_texts(self.embedder, texts, offload=self.offload_embedding)

    @staticmethod
    def _text(key: str, value: Any) -> str:
        text = value.get("text") if isinstance(value, Mapping) else value
        if not isinstance(text, str) or not WORD_RE.search(text):
            raise InvalidValueError(
                f"knowledge-base value for {key!r} must be a str, or a mapping with a "
                f"'text' str, containing at least one word; got {type(value).__name__}"
            )
        return text

    async def store(self, key: str, value: Any) -> str:
        return (await self.store_many([(key, value)]))[0]

    async def store_many(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]]
                         ) -> list[str]:
        """Embed and upsert many documents in one statement; a repeated key keeps its last."""
        pairs = as_pairs(items, "VectorStore.store_many")
        docs: dict[str, tuple[str, orjson.Fragment]] = {}
        for key, value in pairs:
            check_key(key)
            docs[key] = (self._text(key, value), jsonb(value, self.max_value_bytes))
        if not docs:
            return []
        keys = list(docs)
        texts = [docs[k][0] for k in keys]
        vectors = [_vector_literal(v, self.embedder.dim) for v in await self._embed(texts)]
        with pg_errors(f"upserting {len(keys)} document(s)"):
            await self._pool.execute(_UPSERT_DOCS, self.collection, keys, texts,
                                     [docs[k][1] for k in keys], vectors, self.embedder_name)
        return keys

    async def retrieve(self, key: str) -> Any:
        check_key(key)
        with pg_errors(f"reading document {key!r}"):
            row = await self._pool.fetchrow(
                "SELECT value FROM knowledge.documents WHERE collection = $1 AND key = $2",
                self.collection, key)
        if row is None:
            raise NotFoundError(f"document {key!r} not in collection {self.collection!r}")
        return row["value"]

    async def remove(self, key: str) -> None:
        check_key(key)
        with pg_errors(f"removing document {key!r}"):
            await self._pool.execute(
                "DELETE FROM knowledge.documents WHERE collection = $1 AND key = $2",
                self.collection, key)

    async def embedders(self) -> dict[str, int]:
        """Rows of this collection per recorded embedder name (which model made what)."""
        with pg_errors("counting the knowledge base's embedders"):
            rows = await self._pool.fetch(_EMBEDDERS, self.collection)
        return {r["embedder"]: r["n"] for r in rows}

    def _sql(self, template: str, exact: bool) -> str:
        dim = self.embedder.dim
        col = "embedding" if exact or not self.indexed else f"embedding::vector({dim})"
        # an index scan yields distance order only: a second sort key would hide the index
        tiebreak = ", key" if col == "embedding" else ""
        return template.format(col=col, dim=dim, rows=_ROWS.format(dim=dim), tiebreak=tiebreak)

    async def _query(self, query: Any, where: Mapping[str, Any] | None
                     ) -> tuple[str, orjson.Fragment | None] | None:
        """(vector literal, filter) for a search, or None when the query has no direction."""
        if not isinstance(query, str):
            raise InvalidValueError(f"vector search takes text (str), got "
                                    f"{type(query).__name__}")
        if where is not None and not isinstance(where, Mapping):
            raise InvalidValueError(f"where must be a mapping (a JSONB containment filter) or "
                                    f"None, got {type(where).__name__}")
        if not WORD_RE.search(query):
            return None
        embedded = (await self._embed([query]))[0]
        if not any(embedded):  # a zero vector has no direction to compare by
            return None
        flt = None if where is None else jsonb(where, self.max_value_bytes)
        return _vector_literal(embedded, self.embedder.dim), flt

    async def _fetch(self, sql: str, *args: Any) -> list[Hit]:
        with pg_errors("searching the knowledge base"):
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(_HNSW_SETTINGS, str(self.ef_search))
                rows = await conn.fetch(sql, *args)
        return [Hit(r["key"], r["value"], float(r["score"])) for r in rows]

    async def search(self, query: Any, *, limit: int = 10,
                     where: Mapping[str, Any] | None = None, exact: bool = False
                     ) -> list[Hit]:
        """The ``limit`` documents most similar to ``query``, best first, with scores.

        ``where`` is a JSONB containment filter on the value, applied in the same statement
        (HNSW iterative scan: still ``limit`` hits when the filter rejects most candidates).
        ``exact=True`` compares with every row (the ground truth for recall).
        """
        limit = check_limit(limit)
        _check_bool("exact", exact)
        q = await self._query(query, where)
        if q is None:
            return []
        return await self._fetch(self._sql(_SEARCH_DOCS, exact), self.collection, q[0],
                                 limit, q[1], self.embedder_name)

    async def hybrid_search(self, query: Any, *, limit: int = 10,
                            where: Mapping[str, Any] | None = None, candidates: int = 50,
                            k: int = 60) -> list[Hit]:
        """Vector and full-text rankings fused by reciprocal rank, in one statement.

        Each half ranks its ``candidates`` best; a document scores ``1/(k + rank)`` per list
        it is in (k = 60, the constant of the RRF paper, damps the weight of the very top),
        so one that both halves rank well beats one that only one half ranks first. The
        score is the fused one, not a cosine.
        """
        limit = check_limit(limit)
        candidates = positive_int("candidates", candidates)
        k = positive_int("k", k)
        q = await self._query(query, where)
        if q is None:
            return []
        return await self._fetch(self._sql(_HYBRID_DOCS, False), self.collection, q[0], limit,
                                 q[1], self.embedder_name, max(candidates, limit), query, k)

    async def explain(self, query: str, *, exact: bool = False,
                      where: Mapping[str, Any] | None = None) -> list[str]:
        """PostgreSQL's plan of :meth:`search` (``EXPLAIN ANALYZE``), to see the index in use."""
        _check_bool("exact", exact)
        q = await self._query(query, where)
        if q is None:
            return []
        with pg_errors("explaining a knowledge-base search"):
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(_HNSW_SETTINGS, str(self.ef_search))
                rows = await conn.fetch("EXPLAIN ANALYZE " + self._sql(_SEARCH_DOCS, exact),
                                        self.collection, q[0], 10, q[1], self.embedder_name)
        return [r[0] for r in rows]


__all__ = ["HNSW_DIMS", "Embedder", "HashingEmbedder", "VectorStore", "pgvector_missing_message"]
