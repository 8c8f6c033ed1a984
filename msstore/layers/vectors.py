"""VECTOR_STORE: KNOWLEDGE_BASE in ``knowledge.documents`` (pgvector embeddings, JSONB values)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import asyncpg
import orjson

from .._check import positive_int
from .._pg import pg_errors
from ..codec import MAX_VALUE_BYTES
from ..errors import (
    DataRejectedError,
    InvalidOptionError,
    InvalidValueError,
    NotFoundError,
    StoreUnavailableError,
)
from ..keys import check_key
from ..router import Hit
from ._common import as_pairs, check_limit
from .sql import check_pool, jsonb

if TYPE_CHECKING:
    from ..connection import Connection


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors of length ``dim``. Synchronous, like most local models.

    A model that takes milliseconds per call would stall the event loop: open the
    :class:`VectorStore` with ``offload_embedding=True`` and it runs ``embed`` in a thread.
    """

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


_WORD_RE = re.compile(r"\w+")
_STOPWORDS = frozenset(
    "a an and are as at be by do does for from how i in is it its my of on or the this to "
    "was what when where which who why with you your".split()
)


class HashingEmbedder:
    """Deterministic, dependency-free embeddings: hashed words and character trigrams.

    Each lower-cased word (minus a few stop words) adds 1 and each of its character
    trigrams 0.5 to a bucket chosen by BLAKE2b, with a hashed sign so collisions cancel
    rather than pile up; the vector is L2-normalised. It captures shared vocabulary and
    spelling variants, not meaning: good enough to teach ranking, swap in a real model
    (any :class:`Embedder`) for real use.
    """

    def __init__(self, dim: int = 256) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 8:
            raise InvalidOptionError(f"dim must be an int of at least 8, got {dim!r}")
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    def _add(self, vec: list[float], token: str, weight: float) -> None:
        h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "big")
        vec[h % self._dim] += weight if h >> 63 else -weight

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out = []
        for text in texts:
            vec = [0.0] * self._dim
            for word in _WORD_RE.findall(text.lower()):
                if word in _STOPWORDS:
                    continue
                self._add(vec, "w:" + word, 1.0)
                padded = f"<{word}>"
                for i in range(len(padded) - 2):
                    self._add(vec, "c:" + padded[i:i + 3], 0.5)
            norm = math.sqrt(sum(x * x for x in vec))
            out.append([x / norm for x in vec] if norm else vec)
        return out

    def __repr__(self) -> str:
        return f"HashingEmbedder(dim={self._dim})"


class _LayerMissing(StoreUnavailableError):
    """The server lacks what a layer needs (pgvector): the Store keeps its other layers."""


def _check_embedder(embedder: object) -> Embedder:
    if embedder is None:
        return HashingEmbedder()
    if not isinstance(embedder, Embedder):
        raise InvalidOptionError(f"embedder must have a dim and an embed(texts) method "
                                 f"(msstore.Embedder), got {type(embedder).__name__}")
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
INSERT INTO knowledge.documents AS d (collection, key, content, value, embedding)
SELECT $1, t.key, t.content, t.value, t.embedding::vector
FROM unnest($2::text[], $3::text[], $4::jsonb[], $5::text[]) AS t(key, content, value, embedding)
ON CONFLICT (collection, key) DO UPDATE SET
    content = excluded.content, value = excluded.value, embedding = excluded.embedding,
    updated_at = now()
"""

_SEARCH_DOCS = """
SELECT key, value, 1 - (embedding <=> $2::text::vector) AS score
FROM knowledge.documents
WHERE collection = $1 AND ($4::jsonb IS NULL OR value @> $4::jsonb)
ORDER BY embedding <=> $2::text::vector, key
LIMIT $3
"""


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
    text is embedded. ``search(text)`` ranks a collection by cosine similarity, exactly
    (no approximate index), best first; a query with no words returns no hits.
    """

    def __init__(self, pool: asyncpg.Pool, *, collection: str = "knowledge_base",
                 embedder: Embedder | None = None, offload_embedding: bool = False,
                 max_value_bytes: int = MAX_VALUE_BYTES) -> None:
        self._pool = check_pool(pool)
        self.collection = check_key(collection)
        self.embedder: Embedder = _check_embedder(embedder)
        self.offload_embedding = _check_bool("offload_embedding", offload_embedding)
        self.max_value_bytes = positive_int("max_value_bytes", max_value_bytes)

    @classmethod
    async def open(cls, ms: Connection, *, collection: str = "knowledge_base",
                   embedder: Embedder | None = None,
                   offload_embedding: bool = False) -> VectorStore:
        """Check that pgvector and the table exist; raise StoreUnavailableError saying how."""
        check_key(collection)
        _check_embedder(embedder)
        _check_bool("offload_embedding", offload_embedding)
        with pg_errors("checking for pgvector"):
            row = await ms.pool.fetchrow(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') AS ext, "
                "EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector') AS avail,"
                " to_regclass('knowledge.documents') IS NOT NULL AS tbl, "
                "current_setting('server_version') AS version")
        assert row is not None
        server = f"{_redact(ms.database_url)} (PostgreSQL {row['version']})"
        if not row["avail"]:
            raise _LayerMissing(pgvector_missing_message(server))
        if not (row["ext"] and row["tbl"]):
            raise _LayerMissing(
                f"pgvector is available on {server} but knowledge.documents is missing: the "
                "database was migrated before pgvector was installed. Run the DO block of "
                "sql/003_knowledge_base.sql once more (it is idempotent), e.g. with psql -f"
            )
        return cls(ms.pool, collection=collection, embedder=embedder,
                   offload_embedding=offload_embedding)

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        if self.offload_embedding:
            vecs = await asyncio.to_thread(self.embedder.embed, texts)
        else:
            vecs = self.embedder.embed(texts)
        if len(vecs) != len(texts):
            raise InvalidValueError(f"the embedder returned {len(vecs)} vectors for "
                                    f"{len(texts)} texts")
        return vecs

    @staticmethod
    def _text(key: str, value: Any) -> str:
        text = value.get("text") if isinstance(value, Mapping) else value
        if not isinstance(text, str) or not _WORD_RE.search(text):
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
                                     [docs[k][1] for k in keys], vectors)
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

    async def search(self, query: Any, *, limit: int = 10,
                     where: Mapping[str, Any] | None = None) -> list[Hit]:
        """The ``limit`` documents most similar to ``query``, best first, with scores."""
        if not isinstance(query, str):
            raise InvalidValueError(f"vector search takes text (str), got "
                                    f"{type(query).__name__}")
        limit = check_limit(limit)
        if where is not None and not isinstance(where, Mapping):
            raise InvalidValueError(f"where must be a mapping (a JSONB containment filter) or "
                                    f"None, got {type(where).__name__}")
        if not _WORD_RE.search(query):
            return []
        embedded = (await self._embed([query]))[0]
        if not any(embedded):  # a zero vector has no direction to compare by
            return []
        vector = _vector_literal(embedded, self.embedder.dim)
        flt = None if where is None else jsonb(where, self.max_value_bytes)
        try:
            with pg_errors("searching the knowledge base"):
                rows = await self._pool.fetch(_SEARCH_DOCS, self.collection, vector, limit,
                                              flt)
        except DataRejectedError as e:
            if not isinstance(e.__cause__, asyncpg.DataError):
                raise
            raise DataRejectedError(
                f"collection {self.collection!r} holds vectors of another dimension than "
                f"this embedder's {self.embedder.dim} ({e}); use one embedder per collection"
            ) from e
        return [Hit(r["key"], r["value"], float(r["score"])) for r in rows]


def _redact(url: str) -> str:
    """``url`` without its password, for error messages."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)


__all__ = ["Embedder", "HashingEmbedder", "VectorStore", "pgvector_missing_message"]
