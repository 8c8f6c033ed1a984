"""Ports and processes of the embedded servers: free ports, liveness, waiting for an exit, locks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_open(port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``HOST:port``."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_for(previous: dict[str, object] | None, key: str = "port") -> int:
    """The port a server had before if it is free again (stable URLs), else a free one."""
    port = (previous or {}).get(key)
    if isinstance(port, int) and not port_open(port):
        with contextlib.suppress(OSError), socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((HOST, port))
            return port
    return free_port()


def pid_alive(pid: int | None) -> bool:
    """True when ``pid`` runs (a zombie counts as gone)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ("" when it cannot be read)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_gone(pid: int, what: str, timeout: float = 30.0) -> None:
    """Wait until ``pid`` exits; SIGKILL it after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.05)


__all__ = ["HOST", "cmdline", "free_port", "pid_alive", "port_for", "port_open", "wait_gone"]


@contextlib.contextmanager
def file_lock(path: Path, *, folder_mode: int = 0o777) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created, with its folder) so that concurrent
    ``up``/``down`` calls, from any process, never race."""
    path.parent.mkdir(mode=folder_mode, parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
