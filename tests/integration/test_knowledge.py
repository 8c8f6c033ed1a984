"""The knowledge base with a real model: paraphrases, HNSW recall, filters, hybrid search.

Against the real PostgreSQL (pgvector) through ``msstore.connect()``; skipped with the reason
where the server has no pgvector (the external PostgreSQL 15). The real model needs the
``knowledge`` extra, which ``make setup`` installs (dev -> workbook -> knowledge).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import msstore
from benchmarks.knowledge import passages
from msstore import HashingEmbedder, MiniLMEmbedder, VectorStore
from msstore.layers.embedders import _STOPWORDS

OpenVectors = Callable[..., Awaitable[VectorStore]]
PAIRS = json.loads((Path(__file__).parents[1] / "data" / "paraphrases.json").read_text())["pairs"]
#: function words the paraphrase check ignores besides the embedder's stop words
_FUNCTION = {"can", "may", "will", "not", "should", "ought", "get", "into", "there", "after",
             "before", "every", "each", "all", "our", "much", "long", "soon"}


def _stems(text: str) -> set[str]:
    return {w[:4] for w in re.findall(r"\w+", text.lower())
            if w not in _STOPWORDS and w not in _FUNCTION and len(w) > 2}


def test_paraphrase_queries_share_no_content_word_with_their_answer() -> None:
    assert len(PAIRS) >= 20 and len({p["key"] for p in PAIRS}) == len(PAIRS)
    shared = {p["key"]: _stems(p["query"]) & _stems(p["passage"]) for p in PAIRS}
    assert {k: v for k, v in shared.items() if v} == {}


async def _top1(store: VectorStore) -> list[str]:
    """Keys of the paraphrase queries whose own passage the store ranks first."""
    await store.store_many({p["key"]: {"text": p["passage"], "topic": p["topic"]}
                            for p in PAIRS})
    right = []
    for p in PAIRS:
        hits = await store.search(p["query"], limit=1)
        if hits and hits[0].key == p["key"]:
            right.append(p["key"])
    return right


async def test_the_real_model_finds_paraphrases_the_hashing_embedder_misses(
        open_vectors: OpenVectors) -> None:
    model = await open_vectors(embedder=MiniLMEmbedder())
    hashing = await open_vectors(embedder=HashingEmbedder())
    by_model, by_hashing = await _top1(model), await _top1(hashing)
    assert len(by_model) >= 0.8 * len(PAIRS)  # 25 of 26 when written
    assert len(by_hashing) <= 0.2 * len(PAIRS)  # 1 of 26: it matches words, not meaning
    assert len(by_model) >= len(by_hashing) + 0.5 * len(PAIRS)


async def test_each_row_records_the_embedder_and_a_query_meets_only_its_own(
        ms: msstore.Connection, open_vectors: OpenVectors) -> None:
    model = await open_vectors(embedder=MiniLMEmbedder())
    assert model.embedder_name == "sentence-transformers/all-MiniLM-L6-v2"
    assert model.embedder.dim == 384 and model.indexed
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    hashing = VectorStore(ms.pool, collection=model.collection)  # same collection
    await model.store_many({"cat": "A kitten sleeps on the sofa.",
                            "car": "The engine of the vehicle is broken."})
    await hashing.store("dog", "A puppy plays in the garden.")
    assert await model.embedders() == {"hashing-256": 1,
                                       "sentence-transformers/all-MiniLM-L6-v2": 2}
    rows = await ms.pool.fetch("SELECT key, embedder, vector_dims(embedding) AS d "
                               "FROM knowledge.documents WHERE collection = $1 ORDER BY key",
                               model.collection)
    assert [(r["key"], r["embedder"], r["d"]) for r in rows] == [
        ("car", model.embedder_name, 384), ("cat", model.embedder_name, 384),
        ("dog", "hashing-256", 256)]
    assert [h.key for h in await model.search("a young feline napping")] == ["cat", "car"]
    assert [h.key for h in await hashing.search("puppy")] == ["dog"]


def _corpus(n: int) -> dict[str, dict[str, Any]]:
    """Generated passages on 8 topics (the benchmark's generator), with a rare ``tier``."""
    return {f"p{d['n']}": {**d, "tier": "gold" if d["n"] % 20 == 0 else "plain"}
            for d in passages(n)}


@pytest.fixture
async def hnsw_store(ms: msstore.Connection, open_vectors: OpenVectors) -> VectorStore:
    """2,000 generated passages, hashing-embedded (256 dims, indexed), table analysed."""
    store = await open_vectors(embedder=HashingEmbedder())
    await store.store_many(_corpus(2_000))
    async with ms.owner_connection() as owner:  # ANALYZE is the owner's (or autovacuum's)
        await owner.execute("ANALYZE knowledge.documents")
    return store


QUERIES = [d["text"] for d in passages(40, seed=80)]  # new passages of the same generator


async def test_hnsw_search_recalls_at_least_95_percent_of_exact_search(
        hnsw_store: VectorStore) -> None:
    plan = "\n".join(await hnsw_store.explain(QUERIES[0]))
    assert "idx_documents_hnsw_256" in plan  # the approximate path is really taken
    assert "hnsw" not in "\n".join(await hnsw_store.explain(QUERIES[0], exact=True))
    found = total = 0
    for q in QUERIES:
        approx = {h.key for h in await hnsw_store.search(q, limit=10)}
        exact = {h.key for h in await hnsw_store.search(q, limit=10, exact=True)}
        assert len(exact) == 10
        found, total = found + len(approx & exact), total + len(exact)
    assert found / total >= 0.95


async def test_a_metadata_filter_runs_in_the_same_hnsw_query_and_still_fills_the_limit(
        hnsw_store: VectorStore) -> None:
    gold = {"tier": "gold"}  # 1 row in 20: most HNSW candidates are rejected
    assert "idx_documents_hnsw_256" in "\n".join(await hnsw_store.explain(QUERIES[1],
                                                                          where=gold))
    for q in QUERIES[:10]:
        hits = await hnsw_store.search(q, limit=10, where=gold)
        exact = await hnsw_store.search(q, limit=10, where=gold, exact=True)
        assert len(hits) == 10 and all(h.value["tier"] == "gold" for h in hits)
        assert len({h.key for h in hits} & {h.key for h in exact}) >= 8


async def test_hybrid_search_is_the_reciprocal_rank_fusion_of_both_rankings(
        ms: msstore.Connection, open_vectors: OpenVectors) -> None:
    store = await open_vectors(embedder=MiniLMEmbedder())
    await store.store_many({p["key"]: {"text": p["passage"], "topic": p["topic"]}
                            for p in PAIRS})
    query = "my laptop breaks: copy files to a drive"
    fused = await store.hybrid_search(query, limit=5, candidates=26)
    # the two rankings, computed apart: the vector one by search, the text one in SQL
    vec = [h.key for h in await store.search(query, limit=26)]
    txt = [r["key"] for r in await ms.pool.fetch(
        "SELECT key FROM knowledge.documents, websearch_to_tsquery('english', $2) q "
        "WHERE collection = $1 AND tsv @@ q ORDER BY ts_rank_cd(tsv, q) DESC, key",
        store.collection, query)]
    assert txt and txt[0] == "backup"  # the words 'copy', 'files', 'drive', 'laptop'
    expected = {k: 1 / (60 + vec.index(k) + 1) + (1 / (60 + txt.index(k) + 1) if k in txt
                                                  else 0) for k in vec}
    best = sorted(expected, key=lambda k: (-expected[k], k))[:5]
    assert [h.key for h in fused] == best
    assert [h.score for h in fused] == pytest.approx([expected[k] for k in best])
    assert fused[0].key == "backup"  # first in both lists
    billing = await store.hybrid_search("money back for a cancelled order", limit=3,
                                        where={"topic": "billing"})
    assert billing[0].key == "refund" and {h.value["topic"] for h in billing} == {"billing"}
    assert await store.hybrid_search("!!!") == []
