"""``msstore.connect()``: one handle on PostgreSQL and NATS JetStream, embedded or yours.

::

    async with msstore.connect() as ms:        # or: ms = await msstore.connect()
        await ms.pool.fetchval("SELECT 1")      # asyncpg pool, JSONB <-> Python via orjson
        kv = await ms.js.key_value("…")        # nats-py JetStream context

Servers are resolved by :func:`msstore.services.resolve` (env vars, else embedded servers
started on demand); the schema is migrated on connect unless ``migrate=False``.

Two PostgreSQL roles: the pool connects as the application role (embedded: ``msstore_app``,
which reads and writes msstore's schemas and can change none of them); migrations, and
:meth:`Connection.owner_connection` for DDL of your own, connect as the schema's owner
(:attr:`Connection.migration_url`). With only ``MSSTORE_DATABASE_URL`` set, both are that URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final
from urllib.parse import urlsplit

import asyncpg
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from . import migrations, services
from ._check import positive_seconds
from ._credentials import redact
from .codec import init_connection
from .errors import InvalidOptionError, StoreUnavailableError
from .services import Endpoints, ServerInfo

log = logging.getLogger("msstore")

Listener = Callable[[], object]


class _Listeners:
    """Fan-out of nats-py's single ``disconnected_cb``/``reconnected_cb`` to many components.

    nats-py awaits these callbacks inside its reconnect task, so listeners are plain sync
    functions: they must return at once (start a task for anything that does I/O). A listener
    that raises is logged and does not stop the others or the reconnect.
    """

    def __init__(self) -> None:
        self._disconnect: list[Listener] = []
        self._reconnect: list[Listener] = []

    def add(self, on_disconnect: Listener | None, on_reconnect: Listener | None
            ) -> Callable[[], None]:
        pairs = [(lst, fn) for lst, fn in ((self._disconnect, on_disconnect),
                                          (self._reconnect, on_reconnect)) if fn is not None]
        for lst, fn in pairs:
            lst.append(fn)

        def remove() -> None:
            for lst, fn in pairs:
                with contextlib.suppress(ValueError):  # removing twice is harmless
                    lst.remove(fn)
        return remove

    @staticmethod
    def _dispatch(what: str, listeners: list[Listener]) -> None:
        for fn in list(listeners):  # a listener may remove itself
            try:
                fn()
            except Exception:
                log.exception("NATS %s listener %r failed", what, fn)

    async def disconnected(self) -> None:
        self._dispatch("disconnect", self._disconnect)

    async def reconnected(self) -> None:
        self._dispatch("reconnect", self._reconnect)


@dataclass
class Connection:
    """What ``connect()`` returns: the pool, the NATS client and JetStream, and where they are."""

    pool: asyncpg.Pool
    nc: NATS
    js: JetStreamContext
    endpoints: Endpoints
    _listeners: _Listeners = field(default_factory=_Listeners, repr=False, compare=False)
    #: The schema owner's URL (migrations, DDL); "" or the pool's URL: the same role.
    migration_url: str = field(default="", repr=False)

    def add_listener(self, *, on_disconnect: Listener | None = None,
                     on_reconnect: Listener | None = None) -> Callable[[], None]:
        """Call ``on_disconnect()``/``on_reconnect()`` when the NATS client loses/regains its
        server; return a function that removes them.

        Both are sync and must not block (nats-py runs them inside its reconnect loop); also
        ``on_disconnect`` runs once more when the connection is closed.
        """
        return self._listeners.add(on_disconnect, on_reconnect)

    @property
    def database_url(self) -> str:
        return self.endpoints.database_url

    @property
    def nats_url(self) -> str:
        return self.endpoints.nats_url

    async def migrate(self, directory: Path | None = None) -> list[str]:
        """Apply pending schema migrations as the schema's owner; return the files applied."""
        if not self.migration_url or self.migration_url == self.database_url:
            return await migrations.migrate(self.pool, directory)
        async with self.owner_connection() as conn:
            return await migrations.migrate(conn, directory)

    @contextlib.asynccontextmanager
    async def owner_connection(self) -> AsyncIterator[Any]:
        """One connection as the schema's owner (JSONB codecs set), for migrations or DDL of
        your own: the pool's role has no DDL rights. Where both are one role (only
        ``MSSTORE_DATABASE_URL`` set), a connection of the pool."""
        if not self.migration_url or self.migration_url == self.database_url:
            async with self.pool.acquire() as pooled:
                yield pooled
            return
        try:
            conn = await asyncpg.connect(self.migration_url, timeout=DEFAULT_CONNECT_TIMEOUT)
        except (asyncpg.PostgresError, OSError, TimeoutError) as e:
            raise StoreUnavailableError(
                f"cannot connect to PostgreSQL as the schema owner at "
                f"{redact(self.migration_url)}: {e} ({type(e).__name__}); check "
                f"{services.MIGRATION_URL_ENV} or the migration_url passed to connect()") from e
        try:
            await init_connection(conn)
            yield conn
        finally:
            await conn.close()

    async def server_versions(self) -> dict[str, str]:
        """The versions the servers report over the wire (not the binaries on disk)."""
        pg = await self.pool.fetchval("SHOW server_version")
        v = self.nc.connected_server_version
        return {"postgres": str(pg), "nats": f"{v.major}.{v.minor}.{v.patch}"}

    async def pgvector_available(self) -> bool:
        """True when the server can ``CREATE EXTENSION vector``."""
        return bool(await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector')"
        ))

    async def close(self) -> None:
        """Drain NATS (flushing pending publishes) and close the pool.

        While NATS is reconnecting there is nothing to drain into: the client is closed
        instead (nats-py would raise ``ConnectionReconnectingError`` from the drain).
        """
        try:
            if not self.nc.is_closed:
                try:
                    await self.nc.drain()
                except nats.errors.Error:
                    # the socket may be gone too (ConnectionResetError from the transport):
                    # the client ends closed either way
                    with contextlib.suppress(nats.errors.Error, OSError):
                        await self.nc.close()
        finally:
            await self.pool.close()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


#: Session settings of every pooled connection, unless ``connect(server_settings=…)`` says
#: otherwise. JIT off: msstore's statements are short reads or bulk DML, which PostgreSQL's JIT
#: compiles for tens of milliseconds it never wins back (the merge statement of a 10,000-row
#: flush: median 128 ms with JIT, 90 ms without, measured side by side on PostgreSQL 18);
#: asyncpg's maintainers give the same advice for its type introspection queries
#: (MagicStack/asyncpg#875).
DEFAULT_SERVER_SETTINGS: Final[Mapping[str, str]] = MappingProxyType({"jit": "off"})


#: The first connection to NATS tries this many times more, ``FIRST_CONNECT_WAIT`` seconds
#: apart, then gives up: a refused URL fails in about a second, with its cause, instead of
#: nats-py's default of retrying (and logging) until ``connect_timeout``. Once connected, the
#: client reconnects without limit, so a running app lives through a NATS restart.
FIRST_CONNECT_RETRIES: Final = 2
FIRST_CONNECT_WAIT: Final = 0.5
#: The default bound on each server's first connection, seconds.
DEFAULT_CONNECT_TIMEOUT: Final = 3.0
NATS_SCHEMES: Final = ("nats", "tls", "ws", "wss")
#: TLS to NATS: the CA file that signed the server's certificate (else the system's CAs), and
#: a client certificate and key where the server asks for one. Setting any turns TLS on.
NATS_TLS_CA_ENV: Final = "MSSTORE_NATS_TLS_CA"
NATS_TLS_CERT_ENV: Final = "MSSTORE_NATS_TLS_CERT"
NATS_TLS_KEY_ENV: Final = "MSSTORE_NATS_TLS_KEY"
POSTGRES_SCHEMES: Final = ("postgresql", "postgres")


def _source(given: str | None, var: str, info: ServerInfo) -> str:
    """Where a URL came from, so that the message says what to change."""
    if given:
        return "the URL passed to msstore.connect()"
    if info.mode == "external":
        return var
    return f"the embedded server (`msstore status`; or set {var})"


def _check_scheme(url: str, schemes: tuple[str, ...], what: str, where: str) -> None:
    for one in nats_servers(url) if what == "NATS" else [url]:
        scheme = urlsplit(one).scheme
        if scheme not in schemes:
            raise InvalidOptionError(
                f"{what} URL {one!r} has scheme {scheme + '://' if scheme else 'none'}; "
                f"expected {' or '.join(s + '://' for s in schemes)} (fix {where})")


def nats_tls() -> ssl.SSLContext | None:
    """The TLS context for NATS from ``MSSTORE_NATS_TLS_*`` (None: nats-py's default, which
    still verifies a ``tls://`` server against the system's CAs). It verifies the certificate
    chain and the host name, as ``sslmode=verify-full`` does for PostgreSQL."""
    ca, cert, key = (os.environ.get(v) or None
                     for v in (NATS_TLS_CA_ENV, NATS_TLS_CERT_ENV, NATS_TLS_KEY_ENV))
    if not (ca or cert):
        return None
    try:
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise InvalidOptionError(
            f"cannot load the NATS TLS files ({e}); check {NATS_TLS_CA_ENV}={ca!r}, "
            f"{NATS_TLS_CERT_ENV}={cert!r}, {NATS_TLS_KEY_ENV}={key!r}") from e
    return ctx


def nats_servers(url: str) -> list[str]:
    """The server URLs of ``MSSTORE_NATS_URL``: one, or a cluster's, comma-separated."""
    return [u.strip() for u in url.split(",") if u.strip()]


def _cause(e: BaseException, timeout: float) -> str:
    """Why a first connection failed, in words (the last error nats-py or asyncpg saw)."""
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (nothing listens on that port)"
    if isinstance(e, socket.gaierror):
        return f"unknown host ({e.strerror})"
    if isinstance(e, TimeoutError | asyncio.TimeoutError | nats.errors.TimeoutError):
        return f"no answer within {timeout:g} s (connect_timeout)"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS certificate refused ({e.verify_message}): check the CA and the host name"
    if isinstance(e, nats.errors.AuthorizationError) or "Authorization Violation" in str(e):
        return "authorization refused: check the user, password or token in the URL"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return repr(e)


async def _open(database_url: str | None, nats_url: str | None, *, migrate: bool,
                min_size: int, max_size: int, home: Path | None,
                connect_timeout: float, server_settings: Mapping[str, str] | None,
                migration_url: str | None = None) -> Connection:
    connect_timeout = positive_seconds("connect_timeout", connect_timeout)
    for given, schemes, what, var in ((database_url, POSTGRES_SCHEMES, "PostgreSQL",
                                       services.DATABASE_URL_ENV),
                                      (nats_url, NATS_SCHEMES, "NATS", services.NATS_URL_ENV)):
        url = given or os.environ.get(var)
        if url:  # before starting anything: a wrong scheme is a typo, not an outage
            _check_scheme(url, schemes, what,
                          "the URL passed to msstore.connect()" if given else var)
    if migration_url:
        _check_scheme(migration_url, POSTGRES_SCHEMES, "PostgreSQL",
                      "the migration_url passed to msstore.connect()")
    tls = nats_tls()  # before starting anything, as for a scheme
    endpoints = await asyncio.to_thread(services.resolve, home, database_url, nats_url)
    owner_url = migration_url or endpoints.migration_url
    pg_source = _source(database_url, services.DATABASE_URL_ENV, endpoints.postgres)
    pg_shown = redact(endpoints.database_url)
    def create_pool() -> Any:
        return asyncpg.create_pool(
            endpoints.database_url, min_size=min_size, max_size=max_size, init=init_connection,
            timeout=connect_timeout,
            server_settings={**DEFAULT_SERVER_SETTINGS, **(server_settings or {})})

    try:
        try:
            pool = await create_pool()
        except asyncpg.InvalidAuthorizationSpecificationError:  # e.g. the role is missing
            if not (migrate and owner_url and owner_url != endpoints.database_url
                    and await migrations.create_application_role(owner_url,
                                                                 endpoints.database_url)):
                raise
            pool = await create_pool()
    except asyncpg.PostgresError as e:  # it answered: a role, password or database problem
        raise StoreUnavailableError(
            f"PostgreSQL at {pg_shown} refused the connection: {e} "
            f"({type(e).__name__}); check the user, password and database name in "
            f"{pg_source}") from e
    except (OSError, TimeoutError) as e:
        raise StoreUnavailableError(
            f"cannot connect to PostgreSQL at {pg_shown}: "
            f"{_cause(e, connect_timeout)}; is it running? (fix {pg_source})") from e
    nc = NATS()
    listeners = _Listeners()
    first_errors: list[BaseException] = []

    async def on_error(e: Exception) -> None:
        if nc.is_connected or nc.is_reconnecting:
            await _log_nats_error(e)
        else:  # the first connection: report the cause once, below, not every attempt
            first_errors.append(e)

    try:
        await asyncio.wait_for(
            nc.connect(nats_servers(endpoints.nats_url),
                       connect_timeout=connect_timeout,  # type: ignore[arg-type]  # is float
                       max_reconnect_attempts=FIRST_CONNECT_RETRIES, tls=tls,
                       reconnect_time_wait=FIRST_CONNECT_WAIT,  # type: ignore[arg-type]
                       error_cb=on_error,
                       disconnected_cb=listeners.disconnected,
                       reconnected_cb=listeners.reconnected),
            timeout=connect_timeout,
        )
        # connected: from now on reconnect forever (nats-py reads the option at each attempt)
        nc.options["max_reconnect_attempts"] = -1
    except Exception as e:
        with contextlib.suppress(Exception):
            await nc.close()
        await pool.close()
        tried = [x for x in reversed(first_errors)
                 if not isinstance(x, nats.errors.NoServersError)]
        # a refused login is the cause, though the server's closing socket comes after it
        cause = next((x for x in tried if "Authorization Violation" in str(x)),
                     tried[0] if tried else e)
        raise StoreUnavailableError(
            f"cannot connect to NATS at {redact(endpoints.nats_url)}: "
            f"{_cause(cause, connect_timeout)}; "
            f"is it running? (fix {_source(nats_url, services.NATS_URL_ENV, endpoints.nats)})"
        ) from cause
    js = nc.jetstream()
    conn = Connection(pool, nc, js, endpoints, listeners, owner_url)
    try:
        await js.account_info()
    except Exception as e:
        await conn.close()
        raise StoreUnavailableError(
            f"NATS at {redact(endpoints.nats_url)} answers but has no JetStream ({e!r}); "
            "start nats-server with -js"
        ) from e
    if migrate:
        try:
            await conn.migrate()
        except BaseException:
            await conn.close()
            raise
    return conn


async def _log_nats_error(e: Exception) -> None:
    log.warning("NATS: %r", e)


class _Connect:
    """Both ``await connect()`` and ``async with connect()`` work, as with asyncpg."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._conn: Connection | None = None

    def __await__(self) -> Generator[Any, None, Connection]:
        return _open(**self._kwargs).__await__()

    async def __aenter__(self) -> Connection:
        self._conn = await _open(**self._kwargs)
        return self._conn

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._conn is not None:
            await self._conn.close()


def connect(database_url: str | None = None, nats_url: str | None = None, *,
            migrate: bool = True, min_size: int = 1, max_size: int = 10,
            home: Path | None = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
            server_settings: Mapping[str, str] | None = None,
            migration_url: str | None = None) -> _Connect:
    """Connect to PostgreSQL and NATS, starting embedded servers for whatever is not given.

    URLs passed here win over ``MSSTORE_DATABASE_URL`` / ``MSSTORE_NATS_URL``, which win over
    the embedded servers. ``migrate=True`` applies pending schema migrations first;
    ``connect_timeout`` (seconds, 3 by default) bounds each server's first connection: a
    refused or unreachable server fails within it with one :class:`StoreUnavailableError`
    naming the URL, the cause and what to change; later NATS reconnects are unbounded. A URL
    with the wrong scheme is an :class:`InvalidOptionError`, before any server is started.
    ``server_settings`` (PostgreSQL session settings) are applied over
    :data:`DEFAULT_SERVER_SETTINGS` (``jit=off``); pass ``{"jit": "on"}`` to keep JIT.
    ``migration_url`` names the schema's owner for migrations and
    :meth:`Connection.owner_connection`: by default the embedded server's owner, else
    ``MSSTORE_MIGRATION_URL`` with ``MSSTORE_DATABASE_URL``, else the database URL itself.
    """
    return _Connect(database_url=database_url, nats_url=nats_url, migrate=migrate,
                    min_size=min_size, max_size=max_size, home=home,
                    connect_timeout=connect_timeout, server_settings=server_settings,
                    migration_url=migration_url)


__all__ = ["Connection", "connect"]
