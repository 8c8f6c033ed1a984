"""The migration runner against a real PostgreSQL: idempotent, checksummed, race-free."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import asyncpg

import msstore
from msstore import MigrationChecksumError, migrations


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT table_schema || '.' || table_name AS t FROM information_schema.tables "
            "WHERE table_schema IN ('agents', 'tasks', 'messages')"
        )
        return {r["t"] for r in rows}
    finally:
        await conn.close()


async def test_connect_applies_every_file_once_and_the_second_run_changes_nothing(
    fresh_database: Callable[[], object], endpoints: msstore.services.Endpoints
) -> None:
    url = await fresh_database()  # type: ignore[misc]
    shipped = [m.filename for m in migrations.load()]
    async with msstore.connect(url, endpoints.nats_url, migrate=False) as ms:
        assert await ms.migrate() == shipped
        async with ms.pool.acquire() as conn:
            before = await migrations.applied(conn)
        assert await ms.migrate() == []
        async with ms.pool.acquire() as conn:
            assert await migrations.applied(conn) == before
    assert {"agents.state", "agents.checkpoints", "agents.registry", "tasks.queue",
            "messages.log"} <= await _tables(url)


async def test_state_indexes_after_004_and_containment_still_uses_the_gin_index(
    ms: msstore.Connection,
) -> None:
    """004 dropped the duplicate btree and moved the GIN index to jsonb_path_ops."""
    rows = await ms.pool.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'agents' "
        "AND tablename = 'state' ORDER BY indexname")
    assert [r["indexname"] for r in rows] == [
        "idx_state_updated", "idx_state_value_gin", "state_pkey"]
    assert "USING gin (value jsonb_path_ops)" in rows[1]["indexdef"]
    async with ms.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in await conn.fetch(
            "EXPLAIN SELECT key FROM agents.state WHERE value @> $1", {"status": "failed"}))
    assert "idx_state_value_gin" in plan


async def test_a_changed_applied_file_is_refused_by_name(
    fresh_database: Callable[[], object], endpoints: msstore.services.Endpoints, tmp_path: Path
) -> None:
    url = await fresh_database()  # type: ignore[misc]
    shutil.copytree(migrations.default_directory(), tmp_path / "sql")
    async with msstore.connect(url, endpoints.nats_url, migrate=False) as ms:
        await ms.migrate(tmp_path / "sql")
        changed = tmp_path / "sql" / "001_core_schema.sql"
        changed.write_text(changed.read_text() + "\n-- edited after it was applied\n")
        try:
            await ms.migrate(tmp_path / "sql")
        except MigrationChecksumError as e:
            assert "001_core_schema.sql" in str(e)
        else:
            raise AssertionError("a changed applied migration was accepted")


async def test_a_failing_migration_rolls_back_and_is_not_recorded(
    fresh_database: Callable[[], object], endpoints: msstore.services.Endpoints, tmp_path: Path
) -> None:
    url = await fresh_database()  # type: ignore[misc]
    (tmp_path / "001_ok.sql").write_text("CREATE TABLE public.ok (id int);")
    (tmp_path / "002_broken.sql").write_text(
        "CREATE TABLE public.half (id int);\nSELECT * FROM no_such_table;"
    )
    async with msstore.connect(url, endpoints.nats_url, migrate=False) as ms:
        try:
            await ms.migrate(tmp_path)
        except msstore.MigrationError as e:
            assert "002_broken.sql" in str(e)
        else:
            raise AssertionError("a failing migration was reported as applied")
        async with ms.pool.acquire() as conn:
            assert [r["name"] for r in await migrations.applied(conn)] == ["ok"]
            assert await conn.fetchval("SELECT to_regclass('public.half')") is None


async def test_concurrent_migrate_calls_both_succeed_and_apply_each_file_once(
    fresh_database: Callable[[], object], endpoints: msstore.services.Endpoints
) -> None:
    url = await fresh_database()  # type: ignore[misc]
    shipped = [m.filename for m in migrations.load()]
    conns = [await asyncpg.connect(url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrations.migrate(c) for c in conns))
        assert sorted(f for r in results for f in r) == sorted(shipped), results
        assert sum(1 for r in results if r) == 1, "exactly one caller applies the files"
        rows = await migrations.applied(conns[0])
        assert [r["version"] for r in rows] == [m.version for m in migrations.load()]
    finally:
        for c in conns:
            await c.close()


#: Every key of ``agents.*`` leads with ``agent_id``: the column a hash-partitioned or
#: Citus-style distributed table would be split by (README, "PostgreSQL beyond one server").
KEYS_OF_AGENTS = """
SELECT c.conrelid::regclass::text AS tbl, c.conname, c.contype,
       (SELECT array_agg(a.attname ORDER BY k.ord)
        FROM unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum) AS cols
FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
WHERE n.nspname = 'agents' AND c.contype IN ('p', 'u')
UNION ALL
SELECT i.indrelid::regclass::text, i.indexrelid::regclass::text, 'i',
       (SELECT array_agg(a.attname ORDER BY k.ord)
        FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum)
FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname = 'agents' AND i.indisunique
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
"""


async def test_every_key_of_the_agents_schema_leads_with_agent_id(
        ms: msstore.Connection) -> None:
    keys = await ms.pool.fetch(KEYS_OF_AGENTS)
    tables = {r["tbl"] for r in keys}
    assert {"agents.state", "agents.state_tombstones", "agents.checkpoints",
            "agents.registry"} <= tables
    assert [(r["tbl"], r["conname"], r["cols"]) for r in keys
            if not r["cols"] or r["cols"][0] != "agent_id"] == []
