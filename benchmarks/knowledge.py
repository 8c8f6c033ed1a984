"""#8 the knowledge base: HNSW search against an exact scan, the real model against hashing.

* recall@10 of the HNSW search (migration 009: m = 16, ef_construction = 64; ef_search = 100)
  against the exact scan of the same rows, on a generated corpus embedded by the real model
  (all-MiniLM-L6-v2): ``kb_passages`` passages (10,000 at full scale), ``kb_queries`` queries
  that are new passages of the same generator;
* search latency p50/p99, HNSW against exact, query vectors embedded beforehand (a cached
  embedder), so that the figures are PostgreSQL's and not the model's;
* time per passage to embed and store, the real model against the hashing embedder;
* top-1 miss rate on the labelled paraphrase set (tests/data/paraphrases.json: query and
  answer share no content word), the real model against the hashing embedder.

    generate corpus --MiniLM--> store_many (HNSW index grows) --ANALYZE--+
    generate queries --MiniLM--> cached vectors --+-- search (HNSW)  ----+-- recall, latency
                                                  +-- search(exact=True)-+
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

import msstore
from msstore.layers.embedders import Embedder, HashingEmbedder, MiniLMEmbedder, embedder_name

from .common import Comparison, order, percentile, progress

PARAPHRASES = Path(__file__).resolve().parents[1] / "tests" / "data" / "paraphrases.json"

_TOPICS = {
    "billing": ("invoice payment refund card charge subscription price discount receipt "
                "balance").split(),
    "travel": "flight hotel train luggage passport airport booking visa ticket route".split(),
    "health": "doctor sleep diet exercise fever vaccine clinic symptom pill therapy".split(),
    "computers": "laptop router backup password update virus keyboard cloud disk screen".split(),
    "home": "garden kitchen heating roof window plumbing paint furniture lamp carpet".split(),
    "food": "recipe coffee bread cheese soup spice oven dessert salad sauce".split(),
    "work": "meeting salary deadline manager project contract office report hiring team".split(),
    "pets": "dog cat puppy litter leash vet aquarium parrot collar grooming".split(),
}
_VERBS = "explains describes compares lists fixes schedules cancels reviews checks improves".split()
_ADJ = "quick detailed simple urgent annual weekly new broken cheap secure".split()


def passages(n: int, *, seed: int = 8) -> list[dict[str, Any]]:
    """``n`` passages clustered by topic: a topic's words with a few shared verbs/adjectives."""
    rnd = random.Random(seed)
    topics = sorted(_TOPICS)
    out = []
    for i in range(n):
        topic = topics[i % len(topics)]
        words = rnd.sample(_TOPICS[topic], 4)
        text = (f"This {rnd.choice(_ADJ)} note {rnd.choice(_VERBS)} the {words[0]} and the "
                f"{words[1]}, with advice on {words[2]} and {rnd.choice(_ADJ)} {words[3]}.")
        out.append({"text": text, "topic": topic, "n": i})
    return out


def paraphrases() -> list[dict[str, str]]:
    """The labelled paraphrase pairs: key, topic, passage, query."""
    pairs: list[dict[str, str]] = json.loads(PARAPHRASES.read_text())["pairs"]
    return pairs


class CachedEmbedder:
    """Another embedder's vectors for texts embedded beforehand (times the database only)."""

    def __init__(self, inner: Embedder, texts: Sequence[str]) -> None:
        self.dim = inner.dim
        self.name = embedder_name(inner)
        self._vectors = dict(zip(texts, inner.embed(list(texts)), strict=True))

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [self._vectors[t] for t in texts]


async def top1_accuracy(ms: msstore.Connection, embedder: Embedder) -> float:
    """Share of paraphrase queries whose own passage ranks first (a scratch collection)."""
    pairs = paraphrases()
    store = msstore.VectorStore(ms.pool, collection=f"bench_para_{uuid.uuid4().hex[:8]}",
                                embedder=embedder)
    try:
        await store.store_many({p["key"]: {"text": p["passage"], "topic": p["topic"]}
                                for p in pairs})
        hits = 0
        for p in pairs:
            top = await store.search(p["query"], limit=1, exact=True)
            hits += bool(top) and top[0].key == p["key"]
        return hits / len(pairs)
    finally:
        await drop(ms, store.collection)


async def drop(ms: msstore.Connection, collection: str) -> None:
    await ms.pool.execute("DELETE FROM knowledge.documents WHERE collection = $1", collection)


async def load(ms: msstore.Connection, store: msstore.VectorStore,
               docs: Sequence[dict[str, Any]], chunk: int = 500) -> float:
    """Store ``docs`` (keys p0, p1 …) in chunks, then ANALYZE; seconds spent storing."""
    t0 = time.perf_counter()
    for i in range(0, len(docs), chunk):
        await store.store_many({f"p{d['n']}": d for d in docs[i:i + chunk]})
    seconds = time.perf_counter() - t0
    async with ms.owner_connection() as owner:  # ANALYZE is the owner's (or autovacuum's)
        await owner.execute("ANALYZE knowledge.documents")  # the planner must know the rows
    return seconds


async def recall_and_latency(store: msstore.VectorStore, queries: Sequence[str], *,
                             k: int = 10) -> pd.DataFrame:
    """Per query: recall@k of HNSW against exact, and both latencies (µs), order alternating."""
    rows = []
    for i, q in enumerate(queries):
        got: dict[str, list[str]] = {}
        us: dict[str, float] = {}
        for side in order(i, ["hnsw", "exact"]):
            t0 = time.perf_counter()
            hits = await store.search(q, limit=k, exact=side == "exact")
            us[side] = (time.perf_counter() - t0) * 1e6
            got[side] = [h.key for h in hits]
        rows.append({"query": i, "recall": len(set(got["hnsw"]) & set(got["exact"])) / k,
                     "hnsw_us": us["hnsw"], "exact_us": us["exact"],
                     "hnsw_hits": len(got["hnsw"]), "exact_hits": len(got["exact"])})
    return pd.DataFrame(rows)


async def run(ms: msstore.Connection, p: dict[str, int], *, bar: bool = True
              ) -> tuple[list[Comparison], pd.DataFrame]:
    n, nq = p["kb_passages"], p["kb_queries"]
    model, hashing = MiniLMEmbedder(), HashingEmbedder()
    corpus = passages(n)
    queries = [d["text"] for d in passages(nq, seed=80)]
    recall = Comparison(8, "knowledge", "recall@10", "share", "HNSW (ef_search=100)",
                        "exact scan", target=(">=", 0.95), target_text="≥ 0.95",
                        detail=f"{n:,} passages embedded by all-MiniLM-L6-v2, {nq} queries")
    p50 = Comparison(8, "knowledge", "search p50", "µs", "HNSW", "exact scan",
                     detail=f"{n:,} rows of 384 dimensions; query vectors embedded beforehand")
    p99 = Comparison(8, "knowledge", "search p99", "µs", "HNSW", "exact scan")
    embed = Comparison(8, "knowledge", "embed + store, per passage", "µs", "all-MiniLM-L6-v2",
                       "hashing embedder", detail="store_many in chunks of 500, 2 CPU cores")
    miss = Comparison(8, "knowledge", "top-1 miss rate, paraphrases", "share",
                      "all-MiniLM-L6-v2", "hashing embedder",
                      target=("<=", 0.5), target_text="≤ half the hashing embedder's misses",
                      detail=f"{len(paraphrases())} labelled pairs sharing no content word")
    pb = progress(3, "#8 knowledge", bar)
    tag = uuid.uuid4().hex[:8]
    real = msstore.VectorStore(ms.pool, collection=f"bench_kb_{tag}", embedder=model)
    # the same rows (same collection, same embedder name), queried with vectors made beforehand
    searcher = msstore.VectorStore(ms.pool, collection=real.collection,
                                   embedder=CachedEmbedder(model, queries))
    hashed = msstore.VectorStore(ms.pool, collection=f"bench_kbh_{tag}", embedder=hashing)
    try:
        real_s = await load(ms, real, corpus)
        hashed_s = await load(ms, hashed, corpus)
        embed.add(real_s / n * 1e6, hashed_s / n * 1e6)
        pb.update()
        frame = await recall_and_latency(searcher, queries)
        recall.add(float(frame["recall"].mean()), 1.0)
        p50.add(percentile(list(frame["hnsw_us"]), 50), percentile(list(frame["exact_us"]), 50))
        p99.add(percentile(list(frame["hnsw_us"]), 99), percentile(list(frame["exact_us"]), 99))
        pb.update()
        acc_model, acc_hash = await top1_accuracy(ms, model), await top1_accuracy(ms, hashing)
        miss.add(1 - acc_model, 1 - acc_hash)
        frame.attrs.update(top1_model=acc_model, top1_hashing=acc_hash, passages=n,
                           embed_s_model=real_s, embed_s_hashing=hashed_s)
        pb.update()
    finally:
        pb.close()
        await drop(ms, real.collection)
        await drop(ms, hashed.collection)
    return [recall, p50, p99, embed, miss], frame
