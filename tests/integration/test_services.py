"""``msstore up | down | status | env`` against real processes, in a private state folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from msstore import services

MSSTORE = [sys.executable, "-m", "msstore.cli"]


def _cli(home: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSSTORE_")}
    env["MSSTORE_HOME"] = str(home)
    out = subprocess.run([*MSSTORE, *args], env=env, capture_output=True, text=True,
                         timeout=180, check=True)
    return out.stdout


def _our_processes(home: Path) -> dict[str, list[int]]:
    """PIDs of server processes whose command line names this state folder."""
    found: dict[str, list[int]] = {"postgres": [], "nats-server": []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not any(str(home).encode() in a for a in argv):
            continue
        name = Path(argv[0].decode()).name
        if name in found:
            found[name].append(int(entry.name))
    return found


def test_up_twice_starts_one_pair_and_down_leaves_nothing(tmp_path: Path) -> None:
    home = tmp_path / "state"
    first = _cli(home, "up")
    procs = _our_processes(home)
    assert len(procs["postgres"]) == 1 and len(procs["nats-server"]) == 1, procs

    second = _cli(home, "up")
    assert second == first, "the second `up` must reuse the running servers"
    assert _our_processes(home) == procs

    status = _cli(home, "status")
    assert status.count(" up ") == 2, status
    assert "PostgreSQL) 18" in status and "nats-server: v2" in status

    env = _cli(home, "env")
    state = services._read_state(home)
    assert f"export MSSTORE_DATABASE_URL={state['postgres']['url']}" in env
    assert f"export MSSTORE_NATS_URL={state['nats']['url']}" in env

    assert "nats, postgres" in _cli(home, "down")
    assert _our_processes(home) == {"postgres": [], "nats-server": []}
    assert _cli(home, "status").count(" down ") == 2
    assert "nothing was running" in _cli(home, "down")


def test_env_vars_mean_nothing_is_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "state"
    monkeypatch.setenv(services.DATABASE_URL_ENV, "postgresql://u@127.0.0.1:1/db")
    monkeypatch.setenv(services.NATS_URL_ENV, "nats://127.0.0.1:2")
    endpoints = services.resolve(home)
    assert endpoints.postgres.mode == endpoints.nats.mode == "external"
    assert endpoints.database_url == "postgresql://u@127.0.0.1:1/db"
    assert endpoints.nats_url == "nats://127.0.0.1:2"
    assert not (home / "services.json").exists()
    assert _our_processes(home) == {"postgres": [], "nats-server": []}


def test_state_home_is_the_repository_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(services.HOME_ENV, raising=False)
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert services.state_home() == tmp_path / ".msstore"
    monkeypatch.setenv(services.HOME_ENV, str(tmp_path / "elsewhere"))
    assert services.state_home() == tmp_path / "elsewhere"
