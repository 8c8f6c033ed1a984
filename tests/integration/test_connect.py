"""``msstore.connect()``: one handle, both servers, JSONB as Python objects, clear errors."""

from __future__ import annotations

import inspect
import logging
import re
import socket
import time
from urllib.parse import urlsplit, urlunsplit

import pytest

import msstore
from msstore import connection, services


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


def test_the_first_nats_connection_is_bounded_by_the_defaults() -> None:
    """What makes a refused URL fail fast: a few retries, well inside the 3 s default."""
    assert connection.DEFAULT_CONNECT_TIMEOUT == 3.0
    assert inspect.signature(msstore.connect).parameters["connect_timeout"].default == 3.0
    retrying = connection.FIRST_CONNECT_RETRIES * connection.FIRST_CONNECT_WAIT
    assert retrying <= connection.DEFAULT_CONNECT_TIMEOUT / 2


async def test_a_refused_nats_url_fails_fast_once_with_its_cause(
        database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    url = f"nats://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="msstore"), \
            pytest.raises(msstore.StoreUnavailableError) as raised:
        await msstore.connect(database_url, url)
    elapsed = time.monotonic() - start
    message = str(raised.value)
    assert url in message and "connection refused" in message, message
    assert "msstore.connect()" in message  # the URL was passed: that is what to change
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)
    assert elapsed < 3.0, f"the documented bound is 3 s, took {elapsed:.1f} s"
    assert not [r for r in caplog.records if "NATS" in r.getMessage()], \
        "one error, not a log line per reconnect attempt"


async def test_a_refused_nats_url_from_the_environment_names_the_variable(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"nats://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv(services.NATS_URL_ENV, url)
    with pytest.raises(msstore.StoreUnavailableError,
                       match=rf"{re.escape(url)}: connection refused.*MSSTORE_NATS_URL"):
        await msstore.connect(database_url)


async def test_a_wrong_scheme_says_so_before_starting_anything(database_url: str) -> None:
    with pytest.raises(msstore.InvalidOptionError, match=r"http://.*expected nats://"):
        await msstore.connect(database_url, "http://127.0.0.1:4222")
    with pytest.raises(msstore.InvalidOptionError, match=r"PostgreSQL.*expected postgresql://"):
        await msstore.connect("mysql://u@127.0.0.1/db", "nats://127.0.0.1:4222")


async def test_a_postgres_that_answers_with_a_role_error_is_not_told_to_start(
        database_url: str, endpoints: services.Endpoints) -> None:
    parts = urlsplit(database_url)
    url = urlunsplit(parts._replace(netloc=f"no_such_role_x@{parts.hostname}:{parts.port}"))
    with pytest.raises(msstore.StoreUnavailableError) as raised:
        await msstore.connect(url, endpoints.nats_url)
    message = str(raised.value)
    assert "refused the connection" in message and "no_such_role_x" in message, message
    assert "is it running" not in message


async def test_once_connected_nats_reconnects_without_limit(ms: msstore.Connection) -> None:
    assert ms.nc.options["max_reconnect_attempts"] == -1
    assert ms.nc.options["allow_reconnect"] is True
