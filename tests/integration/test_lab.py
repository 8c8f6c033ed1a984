"""``msstore lab`` (what ``make lab`` runs): JupyterLab starts, as root too, and prints the URL
to open, which answers with its token and refuses without it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from msstore import _lab, services

ROOT = Path(__file__).resolve().parents[2]


def test_lab_command_allows_root_only_as_root() -> None:
    args = _lab.lab_command(ROOT / "notebooks", 8888)
    assert ("--allow-root" in args) == (os.geteuid() == 0)
    assert "--no-browser" in args and "--port-retries=0" in args


def test_lab_prints_a_url_that_opens_jupyterlab(tmp_path: Path,
                                                 endpoints: services.Endpoints) -> None:
    env = {**os.environ, "MSSTORE_HOME": str(tmp_path / "state"),
           services.DATABASE_URL_ENV: endpoints.database_url,
           services.NATS_URL_ENV: endpoints.nats_url}
    proc = subprocess.Popen([sys.executable, "-m", "msstore.cli", "lab", str(ROOT / "notebooks"),
                             "--port", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "/lab?token=" in line:
                break
        text = "".join(lines)
        match = re.search(r"(http://127\.0\.0\.1:(\d+))/lab\?token=(\S+)", text)
        assert match, f"no URL printed:\n{text}\n{proc.stderr.read() if proc.poll() else ''}"
        base, _, token = match.groups()
        with urllib.request.urlopen(f"{base}/lab?token={token}", timeout=30) as reply:
            assert reply.status == 200 and "JupyterLab" in reply.read().decode()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/api/contents", timeout=30)
        assert refused.value.code == 403
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    # JupyterLab went with it: nothing answers on its port any more
    assert not _lab.port_open(int(match.group(2)))
