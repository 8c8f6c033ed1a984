"""Whatever ``dumps`` accepts, real PostgreSQL JSONB gives back: equal, and re-encoding to the
same bytes but for JSONB's key order (and -0.0, which ``numeric`` cannot hold, as 0.0).

How hypothesis meets the session-scoped async ``ms`` fixture: the property is a plain sync
``@given`` function, run in a worker thread (``asyncio.to_thread``) so the event loop stays
free; each example sends its queries to that loop with ``asyncio.run_coroutine_threadsafe``
and waits for the answer. Hypothesis keeps its own control flow (shrinking, reporting), and
the pool is only ever used from its own loop.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, example, given, settings

import msstore
from msstore import MsstoreError
from msstore.codec import dumps, loads, reencode
from tests.unit.test_value_mapping import values

Query = Callable[[str, Any], Any]


def jsonb_order(v: Any) -> Any:
    """``v`` as JSONB gives it back: object keys shortest first, then bytewise; -0.0 as 0.0."""
    if isinstance(v, dict):
        return {k: jsonb_order(v[k])
                for k in sorted(v, key=lambda k: (len(k.encode()), k.encode()))}
    if isinstance(v, list):
        return [jsonb_order(x) for x in v]
    if isinstance(v, float) and v == 0.0:
        return 0.0
    return v


def same(a: Any, b: Any) -> bool:
    """Equal with types (1e16 is not 10**16 here); zero's sign is not compared."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def check(v: Any, query: Query) -> None:
    try:
        data = dumps(v)
    except MsstoreError:
        return  # refused before any I/O: tests/unit/test_value_mapping.py covers these
    expected = loads(data)
    for sql, arg in (("SELECT $1::jsonb", v), ("SELECT ($1::text)::jsonb", data.decode())):
        got = query(sql, arg)
        assert same(got, expected), (sql, got, expected)
        again = dumps(got)
        assert again == dumps(jsonb_order(expected)), (sql, again, data)
        assert len(again) <= len(data)  # a hydration fits wherever the original fitted
    # a hydration's path: PostgreSQL's text form, re-encoded by reencode, is exactly what
    # dumps writes for the value JSONB gives back
    text = query("SELECT ($1::text)::jsonb::text", data.decode())
    assert reencode(text) == dumps(query("SELECT ($1::text)::jsonb", data.decode())), text


FLOATS = [1.2345678901234567e18, 1e16, -1e16, 9999999999999998.0, 2.0**63, 2.0**64, 1e300,
          sys.float_info.max, -sys.float_info.max, 5e-324, -5e-324, 2.2250738585072014e-308,
          1e-7, 0.1, 1 / 3, -0.0, 0.0, 1e15, 123456789.125]


def property_test(query: Query) -> None:
    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(values)
    @example(FLOATS)
    @example({"f": 1.2345678901234567e18, "s": "e+ in a string 1e+16", "n": None})
    @example({1e16: 1e16, 2: [2**64 - 1, -(2**63)], "x": (1e300, -0.0)})
    @example({"b": 1, "aa": 2, "a": 3, "é": 4, "ab": 5})
    def prop(v: Any) -> None:
        check(v, query)

    prop()


async def test_jsonb_gives_back_every_value_dumps_accepts(ms: msstore.Connection) -> None:
    loop = asyncio.get_running_loop()

    def query(sql: str, arg: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(ms.pool.fetchval(sql, arg), loop).result(60)

    sent: list[str] = []

    def counted(sql: str, arg: Any) -> Any:
        sent.append(sql)
        return query(sql, arg)

    await asyncio.to_thread(property_test, counted)
    assert len(sent) >= 200  # the property really reached PostgreSQL (4 queries per value)


async def test_each_float_case_comes_back_as_the_same_float(ms: msstore.Connection) -> None:
    for x in FLOATS:
        got = await ms.pool.fetchval("SELECT ($1::text)::jsonb", dumps(x).decode())
        assert type(got) is float and got == x, (x, got)
        assert (await ms.pool.fetchval("SELECT $1::jsonb", x)) == x
    # the fault the big-float encoding fixes: exponent form comes back as an unequal int
    raw = await ms.pool.fetchval("SELECT ($1::text)::jsonb", "1.2345678901234567e18")
    assert raw == 1234567890123456700 and raw != 1.2345678901234567e18
    assert math.copysign(1.0, await ms.pool.fetchval("SELECT $1::jsonb", -0.0)) == 1.0
