"""What :class:`MsstoreStore` checks before any I/O, and the SQL it sends (one statement each).

Namespaces are stored as their labels joined by ``.`` (exact: LangGraph forbids ``.`` in a
label) in the "C" collation, so a namespace prefix is a range of the primary key
(:func:`prefix_condition`). Values are JSONB; filters compile to JSONB operators
(:func:`filter_conditions`). Vectors are rows of ``knowledge.documents`` whose ``value`` names
their item (``{"ns", "key", "field"}``), so PostgreSQL joins them to the items it filters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal

import orjson
from langgraph.store.base import InvalidNamespaceError as LangGraphNamespaceError
from langgraph.store.base import MatchCondition

from ...codec import MAX_VALUE_BYTES, dumps, loads
from ...errors import (
    InvalidKeyError,
    InvalidNamespaceError,
    InvalidOptionError,
    InvalidValueError,
    NotSerializableError,
)


class NamespaceError(InvalidNamespaceError, LangGraphNamespaceError):
    """msstore's :class:`~msstore.errors.InvalidNamespaceError`, also LangGraph's own, so
    handlers written for either catch it."""


RESERVED_ROOT: Final = "langgraph"
OPERATORS: Final = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte")
_ORDERED = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}

# ------------------------------------------------------------------ checks (no I/O)


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains U+0000 (NUL), which PostgreSQL text refuses"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"contains the lone surrogate {text[e.start]!r}, which has no UTF-8 form"
    return None


def check_namespace(namespace: object, *, item: bool = True, write: bool = False,
                    what: str = "namespace") -> tuple[str, ...]:
    """``namespace`` as a tuple, if every label is a non-empty str without ``.`` or NUL.

    ``item``: an item's namespace, which must not be empty (a search prefix may be ``()``);
    ``write``: a put, whose root label must not be LangGraph's reserved ``langgraph``.
    """
    if not isinstance(namespace, tuple | list):
        raise NamespaceError(f"{what} must be a tuple of str labels, got "
                             f"{type(namespace).__name__}: {namespace!r}"[:200])
    ns = tuple(namespace)
    if item and not ns:
        raise NamespaceError(f"{what} must not be empty: give at least one label, "
                             "e.g. ('memories', user_id)")
    for label in ns:
        if not isinstance(label, str):
            raise NamespaceError(f"{what} {ns!r}: labels must be str, got "
                                 f"{type(label).__name__} {label!r}"[:200])
        problem = ("is empty" if not label else
                   "contains '.', LangGraph's label separator" if "." in label else
                   _text_problem(label))
        if problem:
            raise NamespaceError(f"{what} {ns!r}: label {label!r} {problem}; "
                                 "use non-empty labels without '.' or NUL"[:300])
    if write and ns[0] == RESERVED_ROOT:
        raise NamespaceError(f"{what} {ns!r}: the root label {RESERVED_ROOT!r} is reserved "
                             "by LangGraph; choose another first label")
    return ns


def check_item_key(key: object) -> str:
    """An item key: any str PostgreSQL text can hold (LangGraph allows ``""``)."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"item keys must be str, got {type(key).__name__}: {key!r}"[:200])
    problem = _text_problem(key)
    if problem:
        raise InvalidKeyError(f"item key {key[:40]!r} {problem}; remove it")
    return key


def encode_value(value: object, max_bytes: int = MAX_VALUE_BYTES) -> orjson.Fragment:
    """``value`` as JSONB text, if it is a dict that comes back equal (``==``) when read.

    Refused with :class:`InvalidValueError`: non-dicts (LangGraph's contract), and dicts that
    JSON would change (tuples become lists, datetimes and UUIDs strings, int keys str keys).
    JSONB keeps the keys in its own order, so equal, not necessarily in the same order.
    """
    if not isinstance(value, Mapping):
        raise InvalidValueError(f"store values must be dicts (LangGraph's contract), got "
                                f"{type(value).__name__}")
    value = dict(value)
    try:
        data = dumps(value, max_bytes=max_bytes)
    except NotSerializableError as e:
        raise InvalidValueError(f"store value cannot be stored as JSON: {e}") from e
    if loads(data) != value:
        raise InvalidValueError(
            "store value would not read back equal: JSON turns tuples into lists, non-str "
            "keys into str, datetimes/UUIDs/sets into other types; store plain JSON (dict, "
            "list, str, int, float, bool, None)")
    return orjson.Fragment(data)


def check_minutes(name: str, value: object) -> float | None:
    """A TTL in minutes: None (none) or a finite number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0 < value < math.inf):
        raise InvalidOptionError(f"{name} must be None or a number of minutes > 0, "
                                 f"got {value!r}")
    return float(value)


def check_index_paths(index: object) -> list[str] | Literal[False] | None:
    """A put's ``index``: None (the store's fields), False (none) or a list of str paths."""
    if index is None or index is False:
        return index
    if isinstance(index, list | tuple) and all(isinstance(p, str) and p for p in index):
        return list(index)
    raise InvalidOptionError(f"index must be None, False or a list of field paths (str), "
                             f"got {index!r}"[:200])


def ns_text(namespace: Sequence[str]) -> str:
    return ".".join(namespace)


def ns_tuple(text: str) -> tuple[str, ...]:
    return tuple(text.split("."))


# ------------------------------------------------------------------ WHERE clauses


class Params:
    """Positional parameters of one statement: ``p.add(x)`` returns its ``$n``."""

    def __init__(self, *first: Any) -> None:
        self.values: list[Any] = list(first)

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def prefix_condition(prefix: tuple[str, ...], p: Params, col: str = "s.namespace") -> str:
    """``col`` is ``prefix`` or below it: equality or a range of the "C"-collated key."""
    if not prefix:
        return "TRUE"
    text = ns_text(prefix)
    return (f"({col} = {p.add(text)} OR ({col} >= {p.add(text + '.')} "
            f"AND {col} < {p.add(text + '/')}))")  # '/' follows '.' in byte order


def _jsonb(value: Any, max_bytes: int) -> orjson.Fragment:
    try:
        return orjson.Fragment(dumps(value, max_bytes=max_bytes))
    except NotSerializableError as e:
        raise InvalidValueError(f"filter value cannot be encoded as JSON: {e}") from e


def filter_conditions(flt: object, p: Params, max_bytes: int = MAX_VALUE_BYTES) -> list[str]:
    """LangGraph's ``filter`` on top-level fields of the value, as JSONB conditions.

    * ``{"f": x}``, x a scalar or list: ``value->'f'`` equals x (1 equals 1.0; a missing field
      equals None); x a dict without operators: the field contains it (JSONB ``@>``);
    * ``{"f": {"$eq"|"$ne": x}}``: equal / not equal (a missing field counts as None);
    * ``{"f": {"$gt"|"$gte"|"$lt"|"$lte": x}}``, x a number or str: the field has x's JSON
      type and compares so (numbers numerically, strings by JSONB's string order).
    """
    if flt is None:
        return []
    if not isinstance(flt, Mapping):
        raise InvalidValueError(f"filter must be a dict of field → value or operators, "
                                f"got {type(flt).__name__}")
    out: list[str] = []
    for field, want in flt.items():
        if not isinstance(field, str):
            raise InvalidValueError(f"filter fields must be str, got {field!r}")
        f = p.add(field) + "::text"
        this = f"coalesce(s.value->{f}, 'null'::jsonb)"
        if isinstance(want, Mapping) and any(str(k).startswith("$") for k in want):
            for op, x in want.items():
                if op in ("$eq", "$ne"):
                    out.append(f"{this} {'=' if op == '$eq' else '<>'} "
                               f"{p.add(_jsonb(x, max_bytes))}::jsonb")
                elif op in _ORDERED:
                    if isinstance(x, bool) or not isinstance(x, int | float | str):
                        raise InvalidValueError(f"filter {field!r}: {op} compares numbers or "
                                                f"strings, got {x!r}"[:200])
                    v = p.add(_jsonb(x, max_bytes))
                    out.append(f"(jsonb_typeof(s.value->{f}) = jsonb_typeof({v}::jsonb) "
                               f"AND s.value->{f} {_ORDERED[op]} {v}::jsonb)")
                else:
                    raise InvalidValueError(f"filter {field!r}: unknown operator {op!r}; "
                                            f"use one of {', '.join(OPERATORS)}")
        elif isinstance(want, Mapping):
            out.append(f"s.value->{f} @> {p.add(_jsonb(want, max_bytes))}::jsonb")
        else:
            out.append(f"{this} = {p.add(_jsonb(want, max_bytes))}::jsonb")
    return out


def match_conditions(conditions: Iterable[MatchCondition] | None, p: Params) -> list[str]:
    """ListNamespacesOp's prefix/suffix conditions on ``a``, the namespace's label array;
    ``*`` matches any one label."""
    out: list[str] = []
    for cond in conditions or ():
        kind, path = cond.match_type, cond.path
        if kind not in ("prefix", "suffix"):
            raise InvalidOptionError(f"match_type must be 'prefix' or 'suffix', got {kind!r}")
        path = check_namespace(path, item=False, what=f"{kind} pattern")
        if not path:
            continue  # an empty path constrains nothing (as in LangGraph's stores)
        n = len(path)
        parts = [f"cardinality(a) >= {n}"]
        for i, label in enumerate(path, 1):
            if label != "*":
                at = str(i) if kind == "prefix" else f"cardinality(a) - {n - i}"
                parts.append(f"a[{at}] = {p.add(label)}")
        out.append("(" + " AND ".join(parts) + ")")
    return out


# ------------------------------------------------------------------ statements

ITEMS: Final = "langgraph.store_items"
LIVE: Final = "(s.expires_at IS NULL OR s.expires_at > now())"
_REFRESH = "expires_at = now() + s.ttl_minutes * interval '1 minute'"

#: Statements find each row they are given by its key, one index lookup per key
#: (``CROSS JOIN LATERAL (… LIMIT 1 / OFFSET 0)``, which the planner cannot turn into a join),
#: and modify the rows found by ``ctid``: asyncpg prepares statements, and PostgreSQL's cached
#: generic plan for a join against ``unnest($n)`` (made for batches of one, perhaps while the
#: table was small) can scan the whole table per key of a 1,000-op batch (measured: 90 ms
#: for 1,000 gets instead of 4).
_ITEM = f"""CROSS JOIN LATERAL (
        SELECT s.ctid AS id FROM {ITEMS} s
        WHERE s.store = $1 AND s.namespace = {{t}}.namespace AND s.key = {{t}}.key LIMIT 1) f"""
_VECTORS_OF = """CROSS JOIN LATERAL (
        SELECT x.ctid AS id FROM knowledge.documents x
        WHERE x.collection = {collection} AND x.value->>'ns' = {t}.namespace
          AND x.value->>'key' = {t}.key{keep} OFFSET 0) f"""

#: Every GetOp of a batch: ($1 store, $2 namespaces, $3 keys, $4 refresh flags); the refresh
#: moves a live row's expiry, the SELECT reads the rows as they were (same snapshot).
GET_SQL: Final = f"""
WITH found AS (
    SELECT f.*, w.refresh
    FROM unnest($2::text[], $3::text[], $4::bool[]) AS w(namespace, key, refresh)
    CROSS JOIN LATERAL (
        SELECT s.ctid AS id, s.namespace, s.key, s.value, s.created_at, s.updated_at,
               s.ttl_minutes
        FROM {ITEMS} s
        WHERE s.store = $1 AND s.namespace = w.namespace AND s.key = w.key AND {LIVE}
        LIMIT 1) f
), refreshed AS (
    UPDATE {ITEMS} s SET {_REFRESH}
    WHERE s.ctid = ANY(ARRAY(SELECT id FROM found WHERE refresh AND ttl_minutes IS NOT NULL))
    RETURNING 1
)
SELECT namespace, key, value, created_at, updated_at FROM found
"""

#: Every PutOp of a batch: upserts ($2–$5: namespaces, keys, values, TTLs in minutes) and
#: deletes ($6, $7). An expired row not swept yet is replaced as a new item (created_at).
PUT_SQL: Final = f"""
WITH up AS (
    INSERT INTO {ITEMS} AS s (store, namespace, key, value, ttl_minutes, expires_at)
    SELECT $1, t.namespace, t.key, t.value, t.ttl, now() + t.ttl * interval '1 minute'
    FROM unnest($2::text[], $3::text[], $4::jsonb[], $5::float8[]) AS t(namespace, key, value, ttl)
    ON CONFLICT (store, namespace, key) DO UPDATE SET
        value = excluded.value, updated_at = now(), ttl_minutes = excluded.ttl_minutes,
        expires_at = excluded.expires_at,
        created_at = CASE WHEN {LIVE} THEN s.created_at ELSE now() END
    RETURNING 1
), gone AS (
    DELETE FROM {ITEMS} s WHERE s.ctid = ANY(ARRAY(
        SELECT f.id FROM unnest($6::text[], $7::text[]) AS d(namespace, key)
        {_ITEM.format(t="d")}))
    RETURNING 1
){{vectors}}
SELECT (SELECT count(*) FROM up) AS written, (SELECT count(*) FROM gone) AS deleted
"""

#: The vector half of PUT_SQL, where the store has an index: drop the vectors of every item
#: the batch touched that it does not write again ($8 collection, $9 their document keys),
#: then upsert the new ones ($10 contents, $11 values, $12 embeddings, $13 embedder name).
PUT_VECTORS_SQL: Final = f""", stale AS (
    DELETE FROM knowledge.documents d WHERE d.ctid = ANY(ARRAY(
        SELECT f.id
        FROM unnest($2::text[] || $6::text[], $3::text[] || $7::text[]) AS t(namespace, key)
        {_VECTORS_OF.format(collection="$8", t="t",
                            keep=" AND x.key NOT IN (SELECT unnest($9::text[]))")}))
    RETURNING 1
), docs AS (
    INSERT INTO knowledge.documents AS d (collection, key, content, value, embedding, embedder)
    SELECT $8, v.key, v.content, v.value, v.embedding::vector, $13
    FROM unnest($9::text[], $10::text[], $11::jsonb[], $12::text[])
         AS v(key, content, value, embedding)
    ON CONFLICT (collection, key) DO UPDATE SET
        content = excluded.content, value = excluded.value, embedding = excluded.embedding,
        embedder = excluded.embedder, updated_at = now()
    RETURNING 1
)"""

#: One SearchOp: ``{join}`` (the vector scores, or nothing), ``{where}``, then the TTL
#: refresh of the rows returned when ``{refresh}``.
SEARCH_SQL: Final = f"""
WITH hits AS (
    SELECT s.ctid AS id, s.namespace, s.key, s.value, s.created_at, s.updated_at,
           {{score}} AS score
    FROM {ITEMS} s {{join}}
    WHERE s.store = $1 AND {LIVE} AND {{where}}
    ORDER BY score DESC NULLS LAST, s.updated_at DESC, s.namespace, s.key
    LIMIT {{limit}} OFFSET {{offset}}
), refreshed AS (
    UPDATE {ITEMS} s SET {_REFRESH}
    WHERE {{refresh}} AND s.ctid = ANY(ARRAY(SELECT id FROM hits))
      AND s.ttl_minutes IS NOT NULL
    RETURNING 1
)
SELECT namespace, key, value, created_at, updated_at, score FROM hits
ORDER BY score DESC NULLS LAST, updated_at DESC, namespace, key
"""

#: An item's score, joined LATERAL to each item the search's WHERE keeps: the best cosine
#: similarity of its vectors to the query ``{q}`` (max pooling over its fields), found through
#: idx_documents_langgraph_item (migration 010), among vectors of this store's collection,
#: embedder and dimension; NULL for an item without any. Exact: an HNSW walk ranks the whole
#: collection first and cannot filter by namespace or value without losing rows.
SCORED_SQL: Final = """LEFT JOIN LATERAL (
    SELECT max(1 - (d.embedding <=> (SELECT {q}::text::vector({dim})))) AS score
    FROM knowledge.documents d
    WHERE d.collection = {collection} AND d.value->>'ns' = s.namespace
      AND d.value->>'key' = s.key AND d.embedder = {embedder}
      AND vector_dims(d.embedding) = {dim}
) sc ON TRUE"""

#: One ListNamespacesOp: distinct namespaces (cut to ``{depth}`` labels), in tuple order.
LIST_SQL: Final = f"""
SELECT DISTINCT (CASE WHEN {{depth}}::int IS NULL THEN a ELSE a[1:{{depth}}::int] END)
       COLLATE "C" AS ns
FROM (SELECT string_to_array(s.namespace, '.') AS a FROM {ITEMS} s
      WHERE s.store = $1 AND {LIVE}) n
WHERE {{where}}
ORDER BY ns LIMIT {{limit}} OFFSET {{offset}}
"""

#: The sweeper: expired items and their vectors ($2: the collection, NULL without an index).
SWEEP_SQL: Final = f"""
WITH gone AS (
    DELETE FROM {ITEMS} s WHERE s.store = $1 AND s.expires_at <= now()
    RETURNING s.namespace, s.key
){{vectors}}
SELECT count(*) FROM gone
"""
SWEEP_VECTORS_SQL: Final = f""", docs AS (
    DELETE FROM knowledge.documents d WHERE d.ctid = ANY(ARRAY(
        SELECT f.id FROM gone g {_VECTORS_OF.format(collection="$2", t="g", keep="")}))
)"""


__all__ = [
    "GET_SQL",
    "LIST_SQL",
    "OPERATORS",
    "PUT_SQL",
    "PUT_VECTORS_SQL",
    "SCORED_SQL",
    "SEARCH_SQL",
    "SWEEP_SQL",
    "SWEEP_VECTORS_SQL",
    "NamespaceError",
    "Params",
    "check_index_paths",
    "check_item_key",
    "check_minutes",
    "check_namespace",
    "encode_value",
    "filter_conditions",
    "match_conditions",
    "ns_text",
    "ns_tuple",
]
