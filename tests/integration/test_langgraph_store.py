"""MsstoreStore, LangGraph's long-term memory on msstore, on the real servers (both lanes).

Every BaseStore method and its async twin, batches of mixed ops (and that a batch of puts or
gets is one statement), filters with LangGraph's operators, namespace listings, TTL expiry and
refresh, semantic search on the knowledge base (skipped where the server has no pgvector: the
external PostgreSQL 15), hostile namespaces and values refused, and a graph using the store.
LangGraph's conformance package tests checkpointers only: it has no suite for stores.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
from langgraph.store.base import (
    GetOp,
    InvalidNamespaceError,
    ListNamespacesOp,
    MatchCondition,
    PutOp,
    SearchOp,
)

import msstore
from msstore.integrations.langgraph import MsstoreStore
from msstore.layers.embedders import HashingEmbedder

Opener = Callable[..., Any]


@pytest.fixture
async def open_store(ms: msstore.Connection, unique: Callable[[str], str], lane: str
                     ) -> AsyncIterator[Opener]:
    """``await open_store(**options)``: a store of its own name, closed at the end; one with
    an ``index`` skips where pgvector is missing (external lane) and fails if it is missing
    on the embedded server."""
    opened: list[MsstoreStore] = []

    async def make(conn: Any = ms, **options: Any) -> MsstoreStore:
        options.setdefault("name", unique("lgs"))
        try:
            store = await MsstoreStore.open(conn, **options)
        except msstore.StoreUnavailableError as e:
            if lane == "embedded" or "pgvector" not in str(e):
                raise
            pytest.skip(str(e))
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: Opener) -> MsstoreStore:
    return cast(MsstoreStore, await open_store())


def hashing_index(fields: list[str] | None = None) -> dict[str, Any]:
    return {"dims": 256, "embed": HashingEmbedder(), "fields": fields or ["text"]}


async def rows(ms: msstore.Connection, store: MsstoreStore) -> int:
    n: int = await ms.pool.fetchval(
        "SELECT count(*) FROM langgraph.store_items WHERE store = $1", store.name)
    return n


async def vectors(ms: msstore.Connection, store: MsstoreStore) -> int:
    n: int = await ms.pool.fetchval(
        "SELECT count(*) FROM knowledge.documents WHERE collection = $1", store.collection)
    return n


async def expires_at(ms: msstore.Connection, store: MsstoreStore, ns: str, key: str
                     ) -> dt.datetime | None:
    value: dt.datetime | None = await ms.pool.fetchval(
        "SELECT expires_at FROM langgraph.store_items WHERE store = $1 AND namespace = $2 "
        "AND key = $3", store.name, ns, key)
    return value


# ------------------------------------------------------------------ items


async def test_put_then_get_returns_the_item_with_its_namespace_key_and_times(
        store: MsstoreStore) -> None:
    await store.aput(("users", "u1"), "prefs", {"theme": "dark"})
    item = await store.aget(("users", "u1"), "prefs")
    assert item is not None
    assert (item.namespace, item.key, item.value) == (("users", "u1"), "prefs",
                                                      {"theme": "dark"})
    assert item.created_at == item.updated_at and item.created_at.tzinfo is not None
    assert await store.aget(("users", "u1"), "other") is None
    assert await store.aget(("users",), "prefs") is None  # namespaces are exact for get


async def test_a_value_round_trips_exactly(store: MsstoreStore) -> None:
    value = {"text": "héllo 🌍 \"quoted\" \\ back", "n": 2**63 - 1, "neg": -2**63,
             "f": 0.1 + 0.2, "big": 1e300, "tiny": 5e-324, "t": True, "none": None,
             "list": [1, [2, [3, {}]], []], "nested": {"a": {"b": {"c": ["d"]}}},
             "": "empty key", "$op": "dollar key", "a.b": "dotted key"}
    await store.aput(("values",), "", value)  # "" is a valid item key in LangGraph
    item = await store.aget(("values",), "")
    assert item is not None and item.value == value
    assert math.copysign(1, item.value["f"]) == 1 and item.value["f"] == 0.30000000000000004


@pytest.mark.parametrize("value", [
    ["not", "a", "dict"], "text", None.__class__, {"t": (1, 2)}, {"when": dt.datetime(2026, 1, 1)},
    {1: "int key"}, {"nan": float("nan")}, {"inf": math.inf}, {"nul": "a\x00b"},
    {"set": {1, 2}}, {"surrogate": "\ud800"},
], ids=["list", "str", "type", "tuple", "datetime", "int-key", "nan", "inf", "nul", "set",
        "surrogate"])
async def test_values_json_would_change_are_refused_with_invalid_value_error(
        ms: msstore.Connection, store: MsstoreStore, value: Any) -> None:
    with pytest.raises(msstore.InvalidValueError):
        await store.aput(("values",), "k", value)
    assert await rows(ms, store) == 0


@pytest.mark.parametrize("namespace", [
    (), ("",), ("a", ""), ("a.b",), ("a", "b.c"), ("nul\x00",), ("\ud800",), ("a", 1),
    "users", ("langgraph", "x"),
], ids=["empty", "empty-label", "empty-inner", "dot", "inner-dot", "nul", "surrogate",
        "non-str", "not-a-tuple", "reserved-root"])
async def test_hostile_namespaces_are_refused_with_a_typed_error_and_nothing_is_written(
        ms: msstore.Connection, store: MsstoreStore, namespace: Any) -> None:
    with pytest.raises(msstore.InvalidNamespaceError) as caught:
        await store.aput(namespace, "k", {"v": 1})
    assert isinstance(caught.value, msstore.MsstoreError)
    assert isinstance(caught.value, InvalidNamespaceError)  # LangGraph's own class too
    with pytest.raises(msstore.InvalidNamespaceError):  # the batch path checks them too
        await store.abatch([PutOp(("ok",), "k", {"v": 1}), PutOp(namespace, "k", {"v": 1})])
    assert await rows(ms, store) == 0  # the valid op of that batch was not written either
    if namespace != ("langgraph", "x"):  # reading the reserved root is allowed
        with pytest.raises(msstore.InvalidNamespaceError):
            await store.aget(namespace, "k")


async def test_hostile_keys_and_search_prefixes_are_refused(store: MsstoreStore) -> None:
    with pytest.raises(msstore.InvalidKeyError, match="NUL"):
        await store.aput(("a",), "k\x00", {"v": 1})
    with pytest.raises(msstore.InvalidNamespaceError, match=r"'\.'"):
        await store.asearch(("a.b",))
    with pytest.raises(msstore.InvalidNamespaceError):
        await store.alist_namespaces(prefix=("a", ""))
    with pytest.raises(msstore.InvalidOptionError, match="ttl"):
        await store.aput(("a",), "k", {"v": 1}, ttl=0)


async def test_put_again_updates_the_value_and_updated_at_and_keeps_created_at(
        store: MsstoreStore) -> None:
    await store.aput(("a",), "k", {"v": 1})
    first = await store.aget(("a",), "k")
    await store.aput(("a",), "k", {"v": 2})
    second = await store.aget(("a",), "k")
    assert first is not None and second is not None
    assert (second.value, second.created_at) == ({"v": 2}, first.created_at)
    assert second.updated_at > first.updated_at


async def test_delete_removes_the_item_and_deleting_again_is_harmless(
        ms: msstore.Connection, store: MsstoreStore) -> None:
    await store.aput(("a",), "k", {"v": 1})
    await store.aput(("a",), "other", {"v": 2})
    await store.adelete(("a",), "k")
    await store.adelete(("a",), "k")
    await store.adelete(("never",), "k")
    assert await store.aget(("a",), "k") is None
    assert await rows(ms, store) == 1


async def test_stores_with_different_names_do_not_see_each_other(open_store: Opener) -> None:
    one, two = await open_store(), await open_store()
    await one.aput(("shared",), "k", {"who": "one"})
    assert await two.aget(("shared",), "k") is None
    assert await two.alist_namespaces() == []
    assert [i.value for i in await one.asearch(("shared",))] == [{"who": "one"}]


# ------------------------------------------------------------------ batches


async def test_a_mixed_batch_reads_before_its_puts_and_the_last_put_of_a_key_wins(
        store: MsstoreStore) -> None:
    await store.aput(("b",), "old", {"v": 0})
    results = await store.abatch([
        PutOp(("b",), "new", {"v": 1}),
        GetOp(("b",), "new"),
        GetOp(("b",), "old"),
        SearchOp(("b",)),
        ListNamespacesOp(match_conditions=(MatchCondition("prefix", ("b",)),)),
        PutOp(("b",), "new", {"v": 2}),
        PutOp(("b", "c"), "x", {"v": 3}),
        PutOp(("b",), "old", None),
    ])
    assert len(results) == 8
    assert results[1] is None  # the batch's reads see the store as it was before it
    assert results[2] is not None and results[2].value == {"v": 0}
    assert [i.key for i in results[3]] == ["old"]
    assert results[4] == [("b",)]
    assert results[0] is None and results[5:] == [None, None, None]
    assert (await store.aget(("b",), "new")).value == {"v": 2}
    assert await store.aget(("b",), "old") is None
    assert await store.alist_namespaces() == [("b",), ("b", "c")]


class _CountingPool:
    """The real pool, counting the statements sent through it."""

    def __init__(self, pool: Any) -> None:
        self._pool, self.calls = pool, []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._pool, name)
        if name not in ("fetch", "fetchval", "fetchrow", "execute", "executemany"):
            return attr

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return await attr(*args, **kwargs)
        return counted


class _Counting:
    def __init__(self, ms: msstore.Connection) -> None:
        self.pool = _CountingPool(ms.pool)
        self.database_url = ms.database_url


async def test_a_batch_of_puts_is_one_statement_and_a_batch_of_gets_another(
        ms: msstore.Connection, open_store: Opener) -> None:
    counting = _Counting(ms)
    store = await open_store(counting)
    counting.pool.calls.clear()
    await store.abatch([PutOp(("many", str(i % 3)), f"k{i}", {"i": i}) for i in range(200)]
                       + [PutOp(("many", "0"), "k0", None)])
    assert counting.pool.calls == ["execute"]
    got = await store.abatch([GetOp(("many", str(i % 3)), f"k{i}") for i in range(200)])
    assert counting.pool.calls == ["execute", "fetch"]
    assert got[0] is None and [g.value["i"] for g in got[1:]] == list(range(1, 200))
    assert await rows(ms, store) == 199


# ------------------------------------------------------------------ search


async def fill(store: MsstoreStore) -> None:
    await store.abatch([
        PutOp(("docs", "u1"), "a", {"kind": "report", "score": 4.5, "tags": ["x", "y"],
                                    "meta": {"lang": "en", "pages": 3}, "title": "alpha"}),
        PutOp(("docs", "u1"), "b", {"kind": "memo", "score": 3, "tags": ["x"],
                                    "meta": {"lang": "de"}, "title": "beta"}),
        PutOp(("docs", "u2"), "c", {"kind": "report", "score": 10, "title": "gamma",
                                    "meta": {"lang": "en", "pages": 9}}),
        PutOp(("docs_other",), "d", {"kind": "report", "score": 1}),
        PutOp(("user_1",), "e", {"kind": "memo"}),
        PutOp(("userX1",), "f", {"kind": "memo"}),
    ])


async def keys(store: MsstoreStore, prefix: tuple[str, ...], **options: Any) -> set[str]:
    return {i.key for i in await store.asearch(prefix, **options)}


async def test_search_filters_values_by_equality_containment_and_operators(
        store: MsstoreStore) -> None:
    await fill(store)
    docs = ("docs",)
    assert await keys(store, docs, filter={"kind": "report"}) == {"a", "c"}
    assert await keys(store, docs, filter={"kind": "report", "score": 10}) == {"c"}
    assert await keys(store, docs, filter={"score": 3.0}) == {"b"}  # 3 equals 3.0
    assert await keys(store, docs, filter={"tags": ["x"]}) == {"b"}  # lists: equal, not ⊇
    assert await keys(store, docs, filter={"meta": {"lang": "en"}}) == {"a", "c"}  # ⊇
    assert await keys(store, docs, filter={"score": {"$gt": 4.5}}) == {"c"}
    assert await keys(store, docs, filter={"score": {"$gte": 4.5}}) == {"a", "c"}
    assert await keys(store, docs, filter={"score": {"$lt": 4.5}}) == {"b"}
    assert await keys(store, docs, filter={"score": {"$lte": 4.5}}) == {"a", "b"}
    assert await keys(store, docs, filter={"score": {"$gt": 3, "$lt": 10}}) == {"a"}
    assert await keys(store, docs, filter={"score": {"$gt": 9}}) == {"c"}  # numeric, not text
    assert await keys(store, docs, filter={"title": {"$gte": "beta"}}) == {"b", "c"}
    assert await keys(store, docs, filter={"kind": {"$eq": "memo"}}) == {"b"}
    assert await keys(store, docs, filter={"kind": {"$ne": "memo"}}) == {"a", "c"}
    assert await keys(store, docs, filter={"tags": {"$ne": ["x"]}}) == {"a", "c"}  # missing
    assert await keys(store, docs, filter={"tags": None}) == {"c"}  # missing equals None
    assert await keys(store, docs, filter={"kind": "nothing"}) == set()


async def test_search_refuses_unknown_operators_and_incomparable_values(
        store: MsstoreStore) -> None:
    with pytest.raises(msstore.InvalidValueError, match=r"\$regex"):
        await store.asearch(("docs",), filter={"kind": {"$regex": "r.*"}})
    with pytest.raises(msstore.InvalidValueError, match=r"\$gt"):
        await store.asearch(("docs",), filter={"score": {"$gt": [1]}})
    with pytest.raises(msstore.InvalidValueError):
        await store.asearch(("docs",), filter=["kind"])  # type: ignore[arg-type]


async def test_search_scopes_to_a_namespace_prefix_on_whole_labels(
        store: MsstoreStore) -> None:
    await fill(store)
    assert await keys(store, ("docs",)) == {"a", "b", "c"}  # not docs_other
    assert await keys(store, ("docs", "u1")) == {"a", "b"}
    assert await keys(store, ("user_1",)) == {"e"}  # '_' is no wildcard
    assert await keys(store, ()) == {"a", "b", "c", "d", "e", "f"}
    assert await keys(store, ("docs", "u1", "deeper")) == set()


async def test_search_pages_with_limit_and_offset_newest_first(store: MsstoreStore) -> None:
    for i in range(7):
        await store.aput(("page",), f"k{i}", {"i": i})
    pages = [[i.key for i in await store.asearch(("page",), limit=3, offset=o)]
             for o in (0, 3, 6, 9)]
    assert pages == [["k6", "k5", "k4"], ["k3", "k2", "k1"], ["k0"], []]
    assert all(i.score is None for i in await store.asearch(("page",), query="anything"))


# ------------------------------------------------------------------ namespaces


async def test_list_namespaces_with_prefix_suffix_wildcards_depth_limit_and_offset(
        store: MsstoreStore) -> None:
    for ns in [("a", "b", "c"), ("a", "b", "d", "e"), ("a", "b", "d", "i"), ("a", "b", "f"),
               ("a", "c", "f"), ("b", "a", "f"), ("users", "123"), ("users", "456"),
               ("a-x",)]:
        await store.aput(ns, "k", {"v": 1})
    assert await store.alist_namespaces(prefix=("a", "b")) == [
        ("a", "b", "c"), ("a", "b", "d", "e"), ("a", "b", "d", "i"), ("a", "b", "f")]
    assert await store.alist_namespaces(prefix=("a", "b"), max_depth=3) == [
        ("a", "b", "c"), ("a", "b", "d"), ("a", "b", "f")]
    assert await store.alist_namespaces(suffix=("f",)) == [
        ("a", "b", "f"), ("a", "c", "f"), ("b", "a", "f")]
    assert await store.alist_namespaces(prefix=("a", "*", "f")) == [
        ("a", "b", "f"), ("a", "c", "f")]
    assert await store.alist_namespaces(prefix=("a",), suffix=("*", "f")) == [
        ("a", "b", "f"), ("a", "c", "f")]
    assert await store.alist_namespaces(max_depth=1) == [("a",), ("a-x",), ("b",),
                                                         ("users",)]  # tuple order
    everything = await store.alist_namespaces()
    assert len(everything) == 9 and everything == sorted(everything)
    assert await store.alist_namespaces(limit=3, offset=7) == everything[7:]
    assert await store.alist_namespaces(prefix=("users",), limit=1, offset=1) == [
        ("users", "456")]
    assert await store.alist_namespaces(prefix=("nothing",)) == []
    await store.adelete(("a-x",), "k")  # a namespace lives as long as one of its items
    assert ("a-x",) not in await store.alist_namespaces()


# ------------------------------------------------------------------ TTL


async def test_an_item_with_a_ttl_expires_for_every_read_and_the_sweep_deletes_it(
        ms: msstore.Connection, store: MsstoreStore) -> None:
    await store.aput(("ttl",), "short", {"v": 1}, ttl=0.02)  # 1.2 seconds
    await store.aput(("ttl",), "forever", {"v": 2})
    assert (await store.aget(("ttl",), "short")) is not None
    await asyncio.sleep(1.5)
    assert await store.aget(("ttl",), "short") is None
    assert await keys(store, ("ttl",)) == {"forever"}
    await store.aput(("ttl_only",), "gone", {"v": 3}, ttl=0.001)
    await asyncio.sleep(0.2)
    assert ("ttl_only",) not in await store.alist_namespaces()
    assert await rows(ms, store) == 3  # expired rows stay until swept
    assert await store.sweep_ttl() == 2
    assert await rows(ms, store) == 1
    await store.aput(("ttl",), "short", {"v": 4})  # a new item, no TTL
    assert (await store.aget(("ttl",), "short")).value == {"v": 4}


async def test_reads_refresh_the_expiry_unless_told_not_to(
        ms: msstore.Connection, store: MsstoreStore) -> None:
    await store.aput(("ttl",), "k", {"v": 1}, ttl=10)
    first = await expires_at(ms, store, "ttl", "k")
    await asyncio.sleep(0.05)
    await store.aget(("ttl",), "k", refresh_ttl=False)
    assert await expires_at(ms, store, "ttl", "k") == first
    await store.asearch(("ttl",), refresh_ttl=False)
    assert await expires_at(ms, store, "ttl", "k") == first
    await store.aget(("ttl",), "k")  # refresh_on_read defaults to True
    second = await expires_at(ms, store, "ttl", "k")
    assert first is not None and second is not None and second > first
    await asyncio.sleep(0.05)
    await store.asearch(("ttl",))
    third = await expires_at(ms, store, "ttl", "k")
    assert third is not None and third > second
    item = await store.aget(("ttl",), "k", refresh_ttl=False)
    assert item is not None and item.updated_at < second  # a refresh is not an update


async def test_ttl_config_sets_the_default_ttl_and_whether_reads_refresh(
        ms: msstore.Connection, open_store: Opener) -> None:
    store = await open_store(ttl={"default_ttl": 5, "refresh_on_read": False})
    await store.aput(("cfg",), "default", {"v": 1})
    await store.aput(("cfg",), "none", {"v": 1}, ttl=None)
    await store.aput(("cfg",), "own", {"v": 1}, ttl=60)
    minutes = dict(await ms.pool.fetch(
        "SELECT key, ttl_minutes FROM langgraph.store_items WHERE store = $1", store.name))
    assert minutes == {"default": 5.0, "none": None, "own": 60.0}
    before = await expires_at(ms, store, "cfg", "default")
    await asyncio.sleep(0.05)
    await store.aget(("cfg",), "default")  # refresh_on_read False: no refresh
    assert await expires_at(ms, store, "cfg", "default") == before
    await store.aget(("cfg",), "default", refresh_ttl=True)
    assert await expires_at(ms, store, "cfg", "default") > before
    with pytest.raises(msstore.InvalidOptionError, match="default_ttl"):
        MsstoreStore(ms, ttl={"default_ttl": -1})
    with pytest.raises(msstore.InvalidOptionError, match="TTLConfig"):
        MsstoreStore(ms, ttl={"default_tll": 5})  # type: ignore[typeddict-unknown-key]


async def test_the_sweeper_deletes_expired_items_in_the_background(
        ms: msstore.Connection, open_store: Opener) -> None:
    store = await open_store(ttl={"sweep_interval_minutes": 0.005})  # every 0.3 s
    await store.abatch([PutOp(("sweep",), f"k{i}", {"i": i}, ttl=0.001) for i in range(5)]
                       + [PutOp(("sweep",), "kept", {"i": -1})])
    for _ in range(300):  # the sweeper runs every 0.3 s; give it up to 30 s
        if await rows(ms, store) == 1:
            break
        await asyncio.sleep(0.1)
    assert await rows(ms, store) == 1
    assert [i.key for i in await store.asearch(("sweep",))] == ["kept"]


# ------------------------------------------------------------------ semantic search


async def test_semantic_search_ranks_the_relevant_item_first(
        ms: msstore.Connection, open_store: Opener) -> None:
    store = await open_store(index=hashing_index(["text"]))
    await store.abatch([
        PutOp(("mem", "u1"), "tea", {"text": "the user prefers green tea in the morning",
                                     "kind": "drink"}),
        PutOp(("mem", "u1"), "trip", {"text": "flight to Lisbon booked for May",
                                      "kind": "travel"}),
        PutOp(("mem", "u1"), "lang", {"text": "favourite programming language is Rust",
                                      "kind": "work"}),
        PutOp(("mem", "u1"), "plain", {"text": "tea tea tea", "kind": "drink"}, index=False),
        PutOp(("mem", "u2"), "other", {"text": "green tea lover", "kind": "drink"}),
    ])
    assert await vectors(ms, store) == 4  # index=False embeds nothing
    hits = await store.asearch(("mem", "u1"), query="which tea does the user like?")
    assert [h.key for h in hits][:1] == ["tea"] and len(hits) == 4
    scores = [h.score for h in hits]
    assert scores[-1] is None and all(s is not None for s in scores[:-1])  # unembedded last
    assert scores[:-1] == sorted(scores[:-1], reverse=True) and scores[0] > scores[1]
    assert [h.key for h in await store.asearch(("mem",), query="a flight to Lisbon",
                                               limit=1)] == ["trip"]
    drinks = await store.asearch(("mem",), query="green tea", filter={"kind": "drink"})
    assert {h.key for h in drinks} == {"tea", "other", "plain"}
    assert drinks[-1].key == "plain"
    assert [h.key for h in await store.asearch(("mem",), query="Rust programming",
                                               limit=1, offset=0)] == ["lang"]
    wordless = await store.asearch(("mem", "u1"), query="?!")  # no direction: unranked
    assert len(wordless) == 4 and all(h.score is None for h in wordless)


async def test_vectors_follow_their_items_through_updates_deletes_and_the_sweep(
        ms: msstore.Connection, open_store: Opener) -> None:
    store = await open_store(index=hashing_index(["title", "notes[*]"]))
    await store.aput(("v",), "a", {"title": "apples", "notes": ["red fruit", "orchard"]})
    await store.aput(("v",), "b", {"title": "boats", "notes": ["harbour"]}, ttl=0.001)
    assert await vectors(ms, store) == 5  # one per field text: title, notes.0, notes.1, ...
    await store.aput(("v",), "a", {"title": "apples", "notes": ["orchard"]})
    assert await vectors(ms, store) == 4  # the stale notes.1 vector is gone
    await store.aput(("v",), "a", {"title": "apples", "body": "x"}, index=["body"])
    assert await vectors(ms, store) == 3  # the put's own fields replace the store's
    await asyncio.sleep(0.2)  # b's TTL (60 ms) has run out
    hits = await store.asearch(("v",), query="x", limit=5)
    assert [h.key for h in hits] == ["a"]  # b expired: never returned
    assert await store.sweep_ttl() == 1
    assert await vectors(ms, store) == 1
    await store.adelete(("v",), "a")
    assert await vectors(ms, store) == 0


async def test_an_index_config_with_a_plain_embedding_function_works_like_an_embedder(
        open_store: Opener) -> None:
    hashing = HashingEmbedder()
    store = await open_store(index={"dims": 256, "embed": hashing.embed, "fields": ["$"]})
    await store.aput(("f",), "cat", {"about": "cats purr and sleep"})
    await store.aput(("f",), "car", {"about": "cars need fuel"})
    assert [h.key for h in await store.asearch(("f",), query="sleeping cat")][:1] == ["cat"]
    with pytest.raises(msstore.InvalidOptionError, match="dims"):
        MsstoreStore(store.ms, index={"dims": 3, "embed": hashing})
    with pytest.raises(msstore.InvalidOptionError, match="fields"):
        MsstoreStore(store.ms, index={"dims": 256, "embed": hashing, "fields": "text"})


# ------------------------------------------------------------------ lifecycle, sync, graph


async def test_sync_methods_work_from_another_thread_and_refuse_on_the_loop(
        store: MsstoreStore) -> None:
    with pytest.raises(msstore.SyncUnsupportedError, match="aget"):
        store.get(("s",), "k")
    await asyncio.to_thread(store.put, ("s",), "k", {"v": 1})
    got = await asyncio.to_thread(store.get, ("s",), "k")
    assert got is not None and got.value == {"v": 1}
    assert [i.key for i in await asyncio.to_thread(store.search, ("s",))] == ["k"]
    assert await asyncio.to_thread(store.list_namespaces) == [("s",)]
    await asyncio.to_thread(store.delete, ("s",), "k")
    assert await store.aget(("s",), "k") is None
    with pytest.raises(msstore.InvalidNamespaceError):
        await asyncio.to_thread(store.put, ("bad.label",), "k", {"v": 1})


async def test_a_store_used_before_open_or_after_close_says_how_to_open_it(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    store = MsstoreStore(ms, name=unique("lgs"))
    with pytest.raises(msstore.NotOpenError, match="async with MsstoreStore"):
        await store.aget(("a",), "k")
    async with store:
        await store.aput(("a",), "k", {"v": 1})
    with pytest.raises(msstore.NotOpenError):
        await store.aget(("a",), "k")


async def test_an_index_where_pgvector_is_missing_says_how_to_get_it(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    if await ms.pgvector_available():
        pytest.skip("this server has pgvector (the embedded one does)")
    with pytest.raises(msstore.StoreUnavailableError, match="pgvector"):
        await MsstoreStore.open(ms, name=unique("lgs"), index=HashingEmbedder())
    async with MsstoreStore(ms, name=unique("lgs")) as plain:  # without an index it works
        await plain.aput(("a",), "k", {"v": 1})
        assert (await plain.aget(("a",), "k")).value == {"v": 1}


async def test_a_graph_remembers_across_threads_through_the_store(store: MsstoreStore) -> None:
    from typing import TypedDict

    from langgraph.config import get_store
    from langgraph.graph import END, START, StateGraph

    class State(TypedDict):
        user: str
        fact: str
        known: list[str]

    async def remember(state: State) -> dict[str, Any]:
        memories = get_store()
        ns = ("memories", state["user"])
        if state["fact"]:
            await memories.aput(ns, f"f{len(await memories.asearch(ns))}",
                                {"fact": state["fact"]})
        return {"known": sorted(i.value["fact"] for i in await memories.asearch(ns))}

    graph = StateGraph(State).add_node("remember", remember).add_edge(START, "remember") \
        .add_edge("remember", END).compile(store=store)
    await graph.ainvoke({"user": "ana", "fact": "likes tea", "known": []})
    await graph.ainvoke({"user": "ana", "fact": "lives in Porto", "known": []})
    out = await graph.ainvoke({"user": "ana", "fact": "", "known": []})
    assert out["known"] == ["likes tea", "lives in Porto"]
    assert await store.alist_namespaces(prefix=("memories",)) == [("memories", "ana")]
