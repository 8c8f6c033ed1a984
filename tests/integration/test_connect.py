"""``msstore.connect()``: one handle, both servers, JSONB as Python objects, clear errors."""

from __future__ import annotations

import re
import socket

import pytest

import msstore
from msstore import services


async def test_handle_reaches_both_servers(ms: msstore.Connection, lane: str) -> None:
    versions = await ms.server_versions()
    assert int(versions["postgres"].split(".")[0]) >= 15
    assert versions["nats"].count(".") == 2
    assert ms.endpoints.postgres.mode == ms.endpoints.nats.mode or lane == "embedded"
    info = await ms.js.account_info()
    assert info.streams >= 0


async def test_jsonb_round_trips_as_python_objects(ms: msstore.Connection) -> None:
    value = {"plan": ["a", "b"], "n": 3, "nested": {"ok": True, "none": None}}
    assert await ms.pool.fetchval("SELECT $1::jsonb", value) == value
    assert await ms.pool.fetchval("SELECT $1::jsonb -> 'nested' ->> 'ok'", value) == "true"
    assert await ms.pool.fetchval("SELECT '[1, 2]'::json") == [1, 2]


async def test_await_form_works_too(database_url: str, endpoints: services.Endpoints) -> None:
    ms = await msstore.connect(database_url, endpoints.nats_url)
    try:
        assert await ms.pool.fetchval("SELECT 41 + 1") == 42
    finally:
        await ms.close()
    assert ms.nc.is_closed


async def test_jit_is_off_unless_asked_for(ms: msstore.Connection, database_url: str,
                                          endpoints: services.Endpoints) -> None:
    assert await ms.pool.fetchval("SHOW jit") == "off"
    async with msstore.connect(database_url, endpoints.nats_url, migrate=False,
                               server_settings={"jit": "on"}) as mine:
        assert await mine.pool.fetchval("SHOW jit") == "on"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_postgres_is_a_typed_error_naming_the_url(
    endpoints: services.Endpoints,
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/x"
    with pytest.raises(msstore.StoreUnavailableError, match=re.escape(url)):
        await msstore.connect(url, endpoints.nats_url)


async def test_unreachable_nats_is_a_typed_error_naming_the_url(database_url: str) -> None:
    url = f"nats://127.0.0.1:{_closed_port()}"
    with pytest.raises(msstore.StoreUnavailableError, match=re.escape(url)):
        await msstore.connect(database_url, url, connect_timeout=2)
