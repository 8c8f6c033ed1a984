"""Who gets in (issue 15): the embedded servers want their passwords, the application role
can read and write msstore's schemas and change nothing, and hostile names are refused.

Most tests are about the embedded servers and skip in the external lane, whose PostgreSQL
trusts loopback by design; the hostile-name tests run in both.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

import msstore
from msstore import services
from msstore._credentials import with_password
from msstore.migrations import SCHEMAS


def without_password(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port}"))


def wrong_password(url: str) -> str:
    parts = urlsplit(url)
    return with_password(url, parts.username or "", "wrong-" + secrets.token_hex(8))


@pytest.fixture
def embedded(lane: str) -> None:
    if lane != "embedded":
        pytest.skip("the external servers' authentication is theirs to set (CI: trust)")


@pytest.fixture(scope="module")
def home() -> Path:
    return services.state_home()


async def test_postgres_refuses_a_connection_without_the_password_or_with_a_wrong_one(
        embedded: None, endpoints: services.Endpoints) -> None:
    refused: list[str] = []
    for url in (endpoints.database_url, endpoints.migration_url):
        for bad in (without_password(url), wrong_password(url)):
            with pytest.raises((asyncpg.InvalidAuthorizationSpecificationError,
                                asyncpg.InvalidPasswordError)) as caught:
                await asyncpg.connect(bad, timeout=5)
            refused.append(type(caught.value).__name__)
    assert len(refused) == 4, refused
    with pytest.raises(msstore.StoreUnavailableError, match="refused the connection") as e:
        await msstore.connect(wrong_password(endpoints.database_url), endpoints.nats_url)
    assert "wrong-" not in str(e.value)  # the password is not repeated in the message


def test_pg_hba_trusts_no_one_replication_included(embedded: None, home: Path) -> None:
    lines = [ln.split() for ln in (services.pgdata_dir(home) / "pg_hba.conf").read_text()
             .splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) == 6 and {ln[-1] for ln in lines} == {"scram-sha-256"}, lines
    assert sum(ln[1] == "replication" for ln in lines) == 3


async def test_nats_refuses_a_connection_without_credentials_or_with_wrong_ones(
        embedded: None, endpoints: services.Endpoints, database_url: str) -> None:
    parts = urlsplit(endpoints.nats_url)
    bare = f"nats://{parts.hostname}:{parts.port}"
    for bad in (bare, with_password(bare, "msstore", "wrong-" + secrets.token_hex(8))):
        with pytest.raises(msstore.StoreUnavailableError, match="authorization refused") as e:
            await msstore.connect(database_url, bad, migrate=False, connect_timeout=5)
        assert "wrong-" not in str(e.value)


def test_the_credentials_file_is_0600_and_owned_by_who_ran_up(embedded: None,
                                                               home: Path) -> None:
    creds_file = home / "credentials.json"
    for private in (creds_file, home / "nats.conf"):
        st = private.stat()
        assert (oct(st.st_mode & 0o777), st.st_uid) == (oct(0o600), os.geteuid()), private
    creds = json.loads(creds_file.read_text())
    secrets_ = [creds["postgres"]["owner_password"], creds["postgres"]["app_password"],
                creds["nats"]["password"]]
    assert len(set(secrets_)) == 3 and all(len(s) >= 40 for s in secrets_)
    readable = (home / "services.json").read_text() + json.dumps(services.status(home))
    assert not any(s in readable for s in secrets_)


async def test_the_application_role_has_no_ddl_no_superpowers_and_nothing_outside_msstore(
        embedded: None, ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    role = await ms.pool.fetchrow(
        "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
        "FROM pg_roles WHERE rolname = current_user")
    assert role is not None and dict(role) == {
        "rolname": "msstore_app", "rolsuper": False, "rolcreatedb": False,
        "rolcreaterole": False, "rolreplication": False, "rolbypassrls": False}
    secret = f"public.{unique('owner_only')}"
    async with ms.owner_connection() as owner:
        assert await owner.fetchval("SELECT current_user") == "postgres"
        await owner.execute(f"CREATE TABLE {secret} (v text); INSERT INTO {secret} VALUES ('x')")
    refused = []
    for sql in ("CREATE TABLE agents.sneaky (id int)", "CREATE TABLE public.sneaky (id int)",
                "CREATE TEMP TABLE sneaky (id int)", "CREATE SCHEMA sneaky",
                "DROP TABLE agents.state", "ALTER TABLE agents.state ADD COLUMN x int",
                "TRUNCATE agents.state", "CREATE INDEX ON agents.state (key)",
                "SELECT rolpassword FROM pg_authid", f"SELECT * FROM {secret}"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await ms.pool.execute(sql)
        refused.append(sql)
    assert len(refused) == 10
    async with ms.owner_connection() as owner:
        await owner.execute(f"DROP TABLE {secret}")
    agent = uuid.uuid4()  # and it can do its job
    await ms.pool.execute("INSERT INTO agents.state (agent_id, key, value) VALUES ($1, 'k', $2)",
                          agent, {"n": 1})
    assert await ms.pool.fetchval(
        "UPDATE agents.state SET value = $2 WHERE agent_id = $1 RETURNING value", agent,
        {"n": 2}) == {"n": 2}
    assert await ms.pool.execute("DELETE FROM agents.state WHERE agent_id = $1", agent) \
        == "DELETE 1"


async def test_a_table_a_later_migration_creates_is_granted_and_the_app_role_cannot_migrate(
        embedded: None, ms: msstore.Connection, unique: Callable[[str], str],
        tmp_path: Path) -> None:
    later = f"agents.{unique('later')}"
    async with ms.owner_connection() as owner:  # as a future migration would, as the owner
        await owner.execute(f"CREATE TABLE {later} (id int GENERATED ALWAYS AS IDENTITY, v text)")
    try:
        await ms.pool.execute(f"INSERT INTO {later} (v) VALUES ('a'), ('b')")
        assert await ms.pool.fetchval(f"SELECT count(*) FROM {later}") == 2
    finally:
        async with ms.owner_connection() as owner:
            await owner.execute(f"DROP TABLE {later}")
    present = {r[0] for r in await ms.pool.fetch(
        "SELECT nspname FROM pg_namespace WHERE has_schema_privilege(nspname, 'USAGE') "
        "AND nspname = ANY($1::text[])", list(SCHEMAS))}
    assert {"agents", "tasks", "messages"} <= present
    (tmp_path / "999_app_may_not.sql").write_text("CREATE TABLE agents.nope (id int);")
    for m in msstore.migrations.load():
        (tmp_path / m.filename).write_text(m.sql)
    with pytest.raises(msstore.MigrationError, match="needs the schema's owner"):
        await msstore.migrations.migrate(ms.pool, tmp_path)
    assert await ms.migrate() == []  # as the owner: nothing pending, nothing to grant


@pytest.fixture
def stranger() -> Iterator[str]:
    """A second, unprivileged local account, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating a local user needs root")
    name = f"msprobe{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


#: Run as the stranger by the system Python (msstore's venv Python lives under root's home):
#: a NATS client's first lines, by hand, with no credentials and with wrong ones.
NATS_PROBE = """
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
for auth in ({}, {"user": "msstore", "pass": "wrong"}):
    with socket.create_connection((host, port), timeout=5) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"INFO ")
        hello = json.dumps({"verbose": False, **auth}).encode()
        s.sendall(b"CONNECT " + hello + b"\\r\\nPING\\r\\n")
        print(f.readline().decode().strip())
"""


def _as(user: str, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    entry = pwd.getpwnam(user)
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd="/",
                          user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
                          env={"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "5", **env})


def test_another_local_user_gets_into_neither_server(embedded: None, stranger: str,
                                                     endpoints: services.Endpoints,
                                                     home: Path) -> None:
    psql = str(services.postgres_bin() / "psql")
    pg = urlsplit(endpoints.database_url)
    answers: dict[str, Any] = {}
    for user in ("postgres", "msstore_app"):
        for label, env in (("no password", {}), ("wrong password", {"PGPASSWORD": "wrong"})):
            out = _as(stranger, [psql, "-h", str(pg.hostname), "-p", str(pg.port), "-U", user,
                                 "-d", "msstore", "-w", "-Atc", "SELECT 1"], **env)
            answers[f"{user}, {label}"] = (out.returncode, out.stderr.strip()[-80:])
    assert all(code == 2 for code, _ in answers.values()), answers
    assert sum("password authentication failed" in err for _, err in answers.values()) == 2
    assert sum("no password supplied" in err for _, err in answers.values()) == 2
    nats = urlsplit(endpoints.nats_url)
    probe = _as(stranger, ["/usr/bin/python3", "-c", NATS_PROBE, str(nats.hostname),
                           str(nats.port)])
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines() == ["-ERR 'Authorization Violation'"] * 2
    for private in ("credentials.json", "nats.conf"):
        peek = _as(stranger, ["/bin/cat", str(home / private)])
        assert peek.returncode == 1 and "Permission denied" in peek.stderr, private


async def test_an_old_state_folder_is_upgraded_once_on_the_next_up(
        embedded: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old"
    await asyncio.to_thread(services.up, old)
    try:
        # make it look as msstore left it before credentials: trust, no record of auth
        await asyncio.to_thread(services.down, old)
        hba = services.pgdata_dir(old) / "pg_hba.conf"
        hba.write_text("\n".join(ln.replace("scram-sha-256", "trust") if not ln.startswith("#")
                                 else ln for ln in hba.read_text().splitlines()) + "\n")
        state = json.loads((old / "services.json").read_text())
        state["postgres"].pop("owner_url")
        state["nats"].pop("auth")
        (old / "services.json").write_text(json.dumps(state))
        (old / "credentials.json").unlink()
        capsys.readouterr()
        ends = await asyncio.to_thread(services.up, old)
        said = capsys.readouterr().err
        assert said.count("was made before msstore used credentials") == 1, said
        rules = [ln.split()[-1] for ln in hba.read_text().splitlines()
                 if ln.strip() and not ln.lstrip().startswith("#")]
        assert rules == ["scram-sha-256"] * 6, rules
        assert (old / "credentials.json").stat().st_mode & 0o777 == 0o600
        async with msstore.connect(ends.database_url, ends.nats_url,
                                   migration_url=ends.migration_url) as conn:
            assert await conn.pool.fetchval("SELECT current_user") == "msstore_app"
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(wrong_password(ends.migration_url), timeout=5)
        await asyncio.to_thread(services.up, old)
        assert "credentials" not in capsys.readouterr().err  # said once
    finally:
        await asyncio.to_thread(services.purge, old)


async def test_a_migrating_connect_creates_a_missing_application_role_with_its_password(
        embedded: None, tmp_path: Path) -> None:
    home = tmp_path / "bare"
    ends = await asyncio.to_thread(services.up, home)
    try:
        owner = await asyncpg.connect(ends.migration_url, timeout=10)
        try:  # a server where nobody made the role (as on your own servers)
            await owner.execute("DROP OWNED BY msstore_app")
            await owner.execute("DROP ROLE msstore_app")
            async with msstore.connect(ends.database_url, ends.nats_url,
                                       migration_url=ends.migration_url) as conn:
                assert await conn.pool.fetchval("SELECT current_user") == "msstore_app"
                await conn.pool.execute(
                    "INSERT INTO agents.state (agent_id, key, value, version) "
                    "VALUES (gen_random_uuid(), 'k', '1', 1)")
                assert await conn.pool.fetchval("SELECT count(*) FROM agents.state") == 1
            role = await owner.fetchrow(
                "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolcanlogin "
                "FROM pg_roles WHERE rolname = 'msstore_app'")
            assert tuple(role) == (False, False, False, False, True)
            with pytest.raises(asyncpg.InvalidPasswordError):  # its password is the URL's
                await asyncpg.connect(wrong_password(ends.database_url), timeout=5)
            # without migrate=True nothing creates it: the refusal names what to fix
            await owner.execute("DROP OWNED BY msstore_app")
            await owner.execute("DROP ROLE msstore_app")
            with pytest.raises(msstore.StoreUnavailableError, match="refused the connection"):
                await msstore.connect(ends.database_url, ends.nats_url, migrate=False,
                                      migration_url=ends.migration_url)
        finally:
            await owner.close()
    finally:
        await asyncio.to_thread(services.purge, home)


HOSTILE = ["x; DROP TABLE agents.state", "a.b", "a*", "a>", "", "bucket name", "$KV", "é",
           "a\x00b", "../etc", "a'b", 'a"b']


async def test_hostile_bucket_names_are_refused_by_every_entry_point_before_any_io(
        ms: msstore.Connection) -> None:
    async def repo_find(_id: str) -> None:
        return None

    opens: dict[str, Callable[[str], Any]] = {
        "HybridStateManager bucket": lambda b: msstore.HybridStateManager(ms, bucket=b),
        "HybridStateManager durable": lambda b: msstore.HybridStateManager(ms, durable=b),
        "StateLifecycleManager": lambda b: msstore.StateLifecycleManager(ms, bucket=b),
        "AgentRepository": lambda b: msstore.AgentRepository(ms, bucket=b),
        "TieredCacheRepository": lambda b: msstore.TieredCacheRepository(ms, repo_find,
                                                                         bucket=b),
        "KVStore.open": lambda b: msstore.KVStore.open(ms, b),
        "Store.open": lambda b: msstore.Store.open(ms, bucket_prefix=b),
    }
    refused = 0
    before = {s.config.name for s in await ms.js.streams_info()}
    for where, make in opens.items():
        for name in HOSTILE:
            if where == "Store.open" and not name:
                refused += 1  # an empty prefix makes valid names ("_kv"): not hostile
                continue
            with pytest.raises(msstore.InvalidKeyError, match="bucket name"):
                made = make(name)
                if asyncio.iscoroutine(made):
                    await made
            refused += 1
    assert refused == len(opens) * len(HOSTILE)
    assert {s.config.name for s in await ms.js.streams_info()} == before  # nothing created
    assert await ms.pool.fetchval("SELECT to_regclass('agents.state') IS NOT NULL")


async def test_hostile_channels_and_collections_are_data_never_sql(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    log = msstore.MessageLog(ms)
    tag = unique("c")
    sneaky = [f"{tag}'; DROP TABLE agents.state; --", f'{tag}" OR 1=1 --', f"{tag}$1",
              f"{tag}\\'); DELETE FROM messages.log; --"]
    for channel in sneaky:
        await log.append(channel, {"channel": channel})
        page = await log.page(channel, after=0)
        assert [m.payload for m in page.messages] == [{"channel": channel}]
    for bad in ("", "a\x00b", 42, None):
        with pytest.raises(msstore.InvalidKeyError):
            await log.append(bad, {})  # type: ignore[arg-type]
    for bad in ("", "a\x00b", 42):
        with pytest.raises(msstore.InvalidKeyError):
            msstore.VectorStore(ms.pool, collection=bad)  # type: ignore[arg-type]

    class Hostile(msstore.HashingEmbedder):
        @property
        def dim(self) -> Any:  # reaches SQL text as vector(N): must be an int
            return "1); DROP TABLE agents.state; --"

    with pytest.raises(msstore.InvalidOptionError, match=r"embedder\.dim"):
        msstore.VectorStore(ms.pool, collection=unique("kb"), embedder=Hostile())
    assert await ms.pool.fetchval("SELECT count(*) FROM messages.log WHERE channel = ANY($1)",
                                  sneaky) == len(sneaky)
    assert await ms.pool.fetchval("SELECT to_regclass('agents.state') IS NOT NULL")
    await ms.pool.execute("DELETE FROM messages.log WHERE channel = ANY($1)", sneaky)
    await ms.pool.execute("DELETE FROM messages.channel_heads WHERE channel = ANY($1)", sneaky)


async def test_rotating_the_credentials_locks_the_old_passwords_out(
        embedded: None, tmp_path: Path) -> None:
    home = tmp_path / "rotate"
    before = await asyncio.to_thread(services.up, home)
    try:
        after = await asyncio.to_thread(services.rotate_credentials, home)
        assert (after.postgres.port, after.nats.port) == (before.postgres.port, before.nats.port)
        old = [before.database_url, before.migration_url]
        assert old != [after.database_url, after.migration_url]
        for url in old:
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(url, timeout=5)
        with pytest.raises(msstore.StoreUnavailableError, match="authorization refused"):
            await msstore.connect(after.database_url, before.nats_url, migrate=False,
                                  connect_timeout=5)
        async with msstore.connect(after.database_url, after.nats_url,
                                   migration_url=after.migration_url) as conn:
            assert await conn.pool.fetchval("SELECT current_user") == "msstore_app"
        assert (home / "credentials.json").stat().st_mode & 0o777 == 0o600
    finally:
        await asyncio.to_thread(services.purge, home)


def _proc(pid: int, name: str) -> str:
    return (Path("/proc") / str(pid) / name).read_bytes().decode()


async def test_a_worker_process_gets_the_passwords_in_its_environment_not_its_command_line(
        embedded: None, ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    from tests.task_worker import WorkerProcess

    worker = await WorkerProcess.start(ms, "w1", unique("kind"), "--idle-exit", "30")
    try:
        pid = worker.proc.pid
        argv, environ = _proc(pid, "cmdline"), _proc(pid, "environ")
        passwords = [urlsplit(u).password for u in (ms.database_url, ms.nats_url)]
        assert all(passwords) and len(set(passwords)) == 2
        assert not any(p in argv for p in passwords if p), argv  # readable by every user
        assert all(p in environ for p in passwords if p)  # readable by its owner only
        assert os.stat(f"/proc/{pid}/environ").st_mode & 0o077 == 0
    finally:
        report = await worker.kill()
    assert report.counters is None  # killed, not exited: it was running while checked
