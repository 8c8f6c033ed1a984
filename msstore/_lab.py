"""``msstore lab``: JupyterLab on msstore's servers, with one clear line saying what to open.

JupyterLab refuses to run as root unless told ``--allow-root``, and its own start-up log buries
the URL among a dozen lines. This starts it (as root too) with the servers' URLs in its
environment, on a port that is free, with a fresh token; its log goes to the state folder, and
what is printed is the URL to open, once the server answers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from . import services
from ._extras import needs_extra
from ._procs import HOST, free_port, port_open
from .errors import ServiceError

DEFAULT_PORT = 8888
START_TIMEOUT = 120.0


def lab_command(root: Path, port: int) -> list[str]:
    """The ``jupyter lab`` command line (``--allow-root`` when run as root)."""
    args = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ip={HOST}",
            f"--port={port}", "--port-retries=0", f"--ServerApp.root_dir={root}"]
    if os.geteuid() == 0:
        args.append("--allow-root")  # JupyterLab stops with "Running as root is not recommended"
    return args


def _answers(url: str) -> bool:
    with contextlib.suppress(OSError):
        with urllib.request.urlopen(url, timeout=2) as reply:
            return bool(reply.status == 200)
    return False


def run_lab(root: Path, port: int = DEFAULT_PORT, *, start_servers: bool = True) -> int:
    """Start the servers and JupyterLab in ``root``; print the URL; wait until it exits."""
    with needs_extra("msstore lab"):
        import jupyterlab  # noqa: F401  (only to fail early with the extra's name)
    if not root.is_dir():
        raise ServiceError(f"no folder {root} to open JupyterLab in")
    endpoints = services.resolve() if start_servers else None
    if port == 0 or port_open(port):  # 0: any free port, as for a socket
        port = free_port()
    token = secrets.token_urlsafe(24)
    env = {**os.environ, "JUPYTER_TOKEN": token}  # in the environment: not visible in `ps`
    if endpoints is not None:
        env[services.DATABASE_URL_ENV] = endpoints.database_url
        env[services.MIGRATION_URL_ENV] = endpoints.migration_url
        env[services.NATS_URL_ENV] = endpoints.nats_url
    home = services.state_home()
    home.mkdir(parents=True, exist_ok=True)
    log = home / "jupyterlab.log"
    # `kill` of this process must not leave JupyterLab behind: exit through `finally`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with open(log, "w") as out:
        proc = subprocess.Popen(lab_command(root.resolve(), port), cwd=root, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(f"http://{HOST}:{port}/api/status?token={token}"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text()[-2000:]
                raise ServiceError(f"JupyterLab did not start (see {log}):\n{tail}")
            time.sleep(0.2)
        print(f"JupyterLab is running in {root} on the msstore servers (log: {log}).\n"
              f"Open this URL in a browser:\n\n    http://{HOST}:{port}/lab?token={token}\n\n"
              "Ctrl-C stops JupyterLab; the servers keep running (`msstore down` stops them).",
              flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


__all__ = ["DEFAULT_PORT", "lab_command", "run_lab"]
