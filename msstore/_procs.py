"""Ports and processes of the embedded servers: free ports, liveness, waiting for an exit, locks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

HOST = "127.0.0.1"


#: Linux's default ephemeral range, where /proc does not say.
_EPHEMERAL: Final = (32768, 60999)
_BELOW: Final = 10_000  # how many ports under the ephemeral range servers are picked from


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out as clients' source ports."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return _EPHEMERAL
    return low, high


def _bindable(port: int) -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, port))
        return True
    return False


def free_port() -> int:
    """A port nothing uses right now, below the kernel's ephemeral range where there is room.

    Why not the kernel's own pick: a client that keeps reconnecting to a stopped server's
    port inside the ephemeral range can be given that very port as its source port and
    connect to itself (a TCP self-connect). That socket then holds the port, so the server
    cannot come back at its URL (seen once in the cluster fault tests: all three nodes of a
    killed cluster restarted on new ports, and the client never found them).
    """
    low, _ = ephemeral_range()
    if low - _BELOW >= 1024:
        for _ in range(100):
            port = random.randrange(low - _BELOW, low)
            if _bindable(port):
                return port
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


def port_for(previous: dict[str, object] | None, key: str = "port",
             patience: float = 5.0) -> int:
    """The port a server had before if it is free again (stable URLs), else a free one.

    A port that nothing listens on but that cannot be bound yet (a socket of a process just
    gone, a client's short-lived socket) is tried again for ``patience`` seconds before the
    server moves: clients only know the old URL.
    """
    port = (previous or {}).get(key)
    if not isinstance(port, int):
        return free_port()
    deadline = time.monotonic() + patience
    while not port_open(port):
        with contextlib.suppress(OSError), socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((HOST, port))
            return port
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
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


__all__ = ["HOST", "cmdline", "ephemeral_range", "free_port", "pid_alive", "port_for", "port_open",
           "wait_gone"]


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
