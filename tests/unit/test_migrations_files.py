"""Migration files: order, naming, checksums; no server needed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from msstore import MigrationError
from msstore.migrations import default_directory, load


def test_shipped_migrations_are_numbered_contiguously_from_one() -> None:
    migrations = load()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].filename == "001_core_schema.sql"


def test_checksum_is_the_sha256_of_the_file() -> None:
    first = load()[0]
    data = (default_directory() / first.filename).read_bytes()
    assert first.checksum == hashlib.sha256(data).hexdigest()


def test_seed_section_2_objects_are_all_defined() -> None:
    sql = "\n".join(m.sql for m in load())
    for needle in ["CREATE SCHEMA IF NOT EXISTS agents", "CREATE SCHEMA IF NOT EXISTS tasks",
                   "CREATE SCHEMA IF NOT EXISTS messages", "CREATE TABLE agents.state",
                   "idx_state_value_gin", "USING gin (value", "idx_state_key_btree",
                   "idx_state_updated", "CREATE TABLE tasks.queue",
                   "CREATE TABLE agents.checkpoints", "kv_revision",
                   "FUNCTION agents.hydrate_agent_state", "CREATE TABLE agents.registry",
                   "CREATE TABLE messages.log"]:
        assert needle in sql, needle


def test_badly_named_file_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "001_ok.sql").write_text("SELECT 1;")
    (tmp_path / "2_bad name.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"2_bad name\.sql"):
        load(tmp_path)


def test_duplicate_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / "001_a.sql").write_text("SELECT 1;")
    (tmp_path / "001_b.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"001_b\.sql"):
        load(tmp_path)
