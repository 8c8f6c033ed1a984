"""``msstore up | down | status | env`` against real processes, in a private state folder."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from msstore import services
from msstore._credentials import with_password

MSSTORE = [sys.executable, "-m", "msstore.cli"]


def _run(home: Path, *args: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSSTORE_")}
    env["MSSTORE_HOME"] = str(home)
    return subprocess.run([*MSSTORE, *args], env={**env, **env_vars}, capture_output=True,
                          text=True, timeout=180, check=False)


def _cli(home: Path, *args: str) -> str:
    """stdout of a command that must succeed."""
    out = _run(home, *args)
    assert out.returncode == 0, f"msstore {' '.join(args)}: exit {out.returncode}\n{out.stderr}"
    return out.stdout


def _our_processes(home: Path) -> dict[str, list[int]]:
    """PIDs of server processes whose command line names this state folder (or, for
    PostgreSQL run as root from an unreachable folder, its data folder)."""
    found: dict[str, list[int]] = {"postgres": [], "nats-server": []}
    marks = {str(home).encode(), str(services.data_root(home)).encode()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not any(m in a for a in argv for m in marks):
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
    creds = json.loads((home / "credentials.json").read_text())
    pg, nats = creds["postgres"], creds["nats"]
    assert f"export MSSTORE_DATABASE_URL={with_password(state['postgres']['url'], pg['app'], pg['app_password'])}" in env  # noqa: E501
    assert f"export MSSTORE_MIGRATION_URL={with_password(state['postgres']['owner_url'], pg['owner'], pg['owner_password'])}" in env  # noqa: E501
    assert f"export MSSTORE_NATS_URL={with_password(state['nats']['url'], nats['user'], nats['password'])}" in env  # noqa: E501
    shown = (home / "services.json").read_text() + status
    assert not any(secret in shown for secret in
                   (pg["app_password"], pg["owner_password"], nats["password"]))

    assert "nats, postgres" in _cli(home, "down")
    assert _our_processes(home) == {"postgres": [], "nats-server": []}
    status_down = _run(home, "status")
    assert status_down.returncode == 1, "status must fail while a server is down"
    assert status_down.stdout.count(" down ") == 2
    assert "msstore up" in status_down.stderr
    assert "nothing was running" in _cli(home, "down")
    _cli(home, "down", "--purge")
    assert not home.exists()


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


def _modes(path: Path) -> dict[str, int]:
    """Permission bits and owner of ``path`` and every folder above it."""
    return {str(p): p.stat().st_mode & 0o7777 | p.stat().st_uid << 16
            for p in (path, *path.parents)}


@pytest.mark.skipif(os.geteuid() != 0, reason="the embedded PostgreSQL switches user as root only")
def test_up_as_root_outside_a_repository_changes_no_permissions(tmp_path: Path) -> None:
    """The issue's case: root, no repository, ``~/.msstore`` under a ``0700`` home. PostgreSQL
    runs as ``msstore``, which cannot enter that home: its data moves to a folder of its own
    instead of the home being opened (it was: ``/root`` went from 700 to 701)."""
    fake_home = tmp_path / "root"
    fake_home.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSSTORE_")}
    env["HOME"] = str(fake_home)
    before = _modes(fake_home)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*MSSTORE, *args], env=env, cwd="/", capture_output=True,
                              text=True, timeout=180, check=False)

    up = cli("up")
    home = fake_home / ".msstore"
    try:
        assert up.returncode == 0, up.stderr
        assert _modes(fake_home) == before, "msstore up changed a folder's permissions"
        assert (fake_home.stat().st_mode & 0o777) == 0o700
        root = services.data_root(home)
        assert root.parent == services.SYSTEM_STATE, root
        assert (root / "pgdata" / "PG_VERSION").is_file()
        assert root.stat().st_uid == pwd.getpwnam(services.PG_OS_USER).pw_uid
        status = cli("status")
        assert f"state folder: {home}" in status.stdout and status.stdout.count(" up ") == 2
        assert status.returncode == 0, status.stdout + status.stderr
        assert str(root / "pgdata") in status.stdout  # status says where the data is
    finally:
        cli("down")
    assert _our_processes(home) == {"postgres": [], "nats-server": []}
    assert _modes(fake_home) == before
    purged = cli("down", "--purge")
    assert purged.returncode == 0 and f"and {root}" in purged.stdout
    assert not root.exists() and not home.exists()


def test_status_fails_and_env_starts_nothing_while_a_server_is_down(tmp_path: Path) -> None:
    home = tmp_path / "state"
    _cli(home, "up")
    try:
        services.down(home, which=("nats",))
        out = _run(home, "status", "--json")
        assert out.returncode == 1
        state = json.loads(out.stdout)
        health = {row["server"]: row["health"] for row in state["servers"]}
        assert health == {"postgres": "up", "nats": "down"} and state["healthy"] is False
        pg = next(row for row in state["servers"] if row["server"] == "postgres")
        assert pg["pid"] == _our_processes(home)["postgres"][0] and pg["url"].startswith(
            "postgresql://")
        assert "PostgreSQL" in pg["version"]

        env = _run(home, "env")
        assert env.returncode == 1 and "nats not answering" in env.stderr
        nats = json.loads((home / "credentials.json").read_text())["nats"]
        url = with_password(state["servers"][1]["url"], nats["user"], nats["password"])
        assert f"export MSSTORE_NATS_URL={url}" in env.stdout
        assert _our_processes(home)["nats-server"] == [], "`env` must not start servers"
        assert _run(home, "env", "--start").returncode == 0
        assert len(_our_processes(home)["nats-server"]) == 1
        assert json.loads(_cli(home, "status", "--json"))["healthy"] is True
    finally:
        _cli(home, "down", "--purge")


def test_status_fails_when_an_external_server_is_unreachable(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        out = _run(tmp_path / "state", "status", "--json",
                   MSSTORE_DATABASE_URL=f"postgresql://u@127.0.0.1:{port}/db",
                   MSSTORE_NATS_URL=f"nats://127.0.0.1:{port}")
    assert out.returncode == 1
    rows = json.loads(out.stdout)["servers"]
    assert [(r["mode"], r["health"]) for r in rows] == [("external", "unreachable")] * 2


def test_help_lists_public_commands_in_plain_text_and_a_closed_pipe_is_quiet(
        tmp_path: Path) -> None:
    out = _cli(tmp_path, "--help")
    assert "`" not in out and "probe" not in out
    for command in ("up", "down", "status", "env", "migrate", "workbook", "bench"):
        assert f"\n    {command} " in out, command
    # `msstore --help | head -1`: the reader closes the pipe before msstore is done
    head = subprocess.run(f"{sys.executable} -m msstore.cli --help | head -c 10", shell=True,
                          capture_output=True, text=True, timeout=60, check=False)
    assert head.stdout == "usage: mss" and "BrokenPipeError" not in head.stderr, head.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the embedded PostgreSQL switches user as root only")
def test_a_deleted_state_folder_takes_its_system_data_folder_with_it(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    first, second = closed / "one", closed / "two"
    services.up(first, which=("postgres",))
    services.down(first, which=("postgres",))
    orphan = services.data_root(first)
    assert orphan.parent == services.SYSTEM_STATE and orphan.is_dir()
    shutil.rmtree(first)
    services.up(second, which=("postgres",))
    try:
        assert not orphan.exists(), "the data of a deleted state folder must be removed"
        assert services.data_root(second).is_dir()
    finally:
        services.purge(second)
    assert not services.data_root(second).exists()
