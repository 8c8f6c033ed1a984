"""Versioned plain-SQL migrations: numbered files, checksums, one advisory lock.

``sql/NNN_name.sql`` files are applied in order, each in its own transaction together with
its row in ``public.msstore_migrations`` (version, name, sha256, applied_at), so a file is
either applied and recorded or neither. A session-level advisory lock serialises concurrent
starts: the second caller waits, then finds nothing pending. An applied file whose checksum
changed is refused, naming the file, because the database no longer matches the source.

Migrations run as the schema's owner. When the server has the application role
(``msstore_app``: the embedded server creates it; elsewhere ``CREATE ROLE msstore_app LOGIN
PASSWORD '…'``), each run ends by granting it exactly what the application needs and
nothing more: ``USAGE`` on msstore's schemas (:data:`SCHEMAS`), ``SELECT, INSERT, UPDATE,
DELETE`` on their tables, ``USAGE, SELECT`` on their sequences, the same by default for
tables later migrations create, and ``SELECT`` on ``public.msstore_migrations``; and
``TEMPORARY`` on the database is revoked from ``PUBLIC`` (temporary tables are DDL too). Only
when something is missing, so a current database sees one catalog query. A run with nothing
pending needs no DDL at all, so the application role may call it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg

from ._credentials import PG_APP
from ._pg import TRANSLATED, pg_error, pg_errors
from .errors import MigrationChecksumError, MigrationError, StoreError, StoreUnavailableError

#: Arbitrary but fixed: the advisory-lock key all msstore migration runners agree on.
LOCK_KEY = 0x6D5_5354_4F52  # "msSTOR"
_FILE_RE = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")
#: msstore's schemas: the application role gets read/write on these and nothing else.
SCHEMAS = ("agents", "tasks", "messages", "knowledge", "langgraph")

_GRANTS_MISSING = """
SELECT EXISTS (
    SELECT 1 FROM pg_namespace n WHERE n.nspname = ANY($1::text[])
        AND NOT has_schema_privilege($2, n.oid, 'USAGE')
    UNION ALL
    SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = ANY($1::text[]) AND (
        (c.relkind IN ('r', 'p') AND NOT has_table_privilege($2, c.oid, 'DELETE'))
        OR (c.relkind = 'S' AND NOT has_sequence_privilege($2, c.oid, 'USAGE')))
    UNION ALL
    SELECT 1 WHERE NOT has_table_privilege($2, 'public.msstore_migrations', 'SELECT')
        OR has_database_privilege($2, current_database(), 'TEMP'))
"""

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS public.msstore_migrations (
    version    INTEGER     PRIMARY KEY,
    name       TEXT        NOT NULL,
    checksum   TEXT        NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str
    checksum: str

    @property
    def filename(self) -> str:
        return f"{self.version:03d}_{self.name}.sql"


def default_directory() -> Path:
    """The packaged ``msstore/sql`` in a wheel, else ``sql/`` of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "sql", here.parent / "sql"):
        if candidate.is_dir() and any(candidate.glob("*.sql")):
            return candidate
    raise MigrationError(f"no SQL migrations found next to {here}; the installation is broken")


def load(directory: Path | None = None) -> list[Migration]:
    """Read and order the migration files; refuse badly named or duplicate versions."""
    directory = directory or default_directory()
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _FILE_RE.match(path.name)
        if not m:
            raise MigrationError(
                f"{path.name}: migration files must be named NNN_lower_snake.sql"
            )
        version = int(m.group(1))
        if version in found:
            raise MigrationError(
                f"{path.name}: version {version} already used by {found[version].filename}"
            )
        data = path.read_bytes()
        found[version] = Migration(version, m.group(2), data.decode("utf-8"),
                                   hashlib.sha256(data).hexdigest())
    return [found[v] for v in sorted(found)]


async def applied(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """The recorded migrations, oldest first (empty before the first run)."""
    with pg_errors("read the applied migrations"):
        exists = await conn.fetchval(
            "SELECT to_regclass('public.msstore_migrations') IS NOT NULL")
        if not exists:
            return []
        rows = await conn.fetch(
            "SELECT version, name, checksum, applied_at FROM public.msstore_migrations "
            "ORDER BY version"
        )
    return [dict(r) for r in rows]


async def migrate(target: asyncpg.Pool | asyncpg.Connection,
                  directory: Path | None = None) -> list[str]:
    """Apply pending migrations in order; return the file names applied by this call."""
    migrations = load(directory)
    if isinstance(target, asyncpg.Pool):
        with pg_errors("migrate the schema"):
            async with target.acquire() as conn:
                return await _migrate(conn, migrations)
    with pg_errors("migrate the schema"):
        return await _migrate(target, migrations)


def _needs_owner(what: str, e: BaseException) -> MigrationError:
    return MigrationError(
        f"{what} needs the schema's owner, but this connection's role may not change the "
        f"schema ({e}); run `msstore migrate`, or pass the owner's URL as "
        "connect(migration_url=…) (or MSSTORE_MIGRATION_URL)")


async def _migrate(conn: Any, migrations: list[Migration]) -> list[str]:
    with pg_errors("take the migration lock"):
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        done = {r["version"]: r for r in await applied(conn)}
        if not done:
            try:
                with pg_errors("create public.msstore_migrations"):
                    await conn.execute(_CREATE_TABLE)
            except StoreError as e:
                if isinstance(e.__cause__, asyncpg.InsufficientPrivilegeError):
                    raise _needs_owner("public.msstore_migrations", e.__cause__) from e
                raise
        known = {m.version: m for m in migrations}
        for version, row in done.items():
            m = known.get(version)
            if m is None:
                raise MigrationError(
                    f"the database has migration {version:03d}_{row['name']}.sql, which this "
                    "msstore does not ship; upgrade msstore or use another database"
                )
            if m.checksum != row["checksum"]:
                raise MigrationChecksumError(
                    f"{m.filename} was changed after it was applied (checksum "
                    f"{row['checksum'][:12]}… in the database, {m.checksum[:12]}… on disk); "
                    "restore the file and put the change in a new, higher-numbered migration"
                )
        newly: list[str] = []
        for m in migrations:
            if m.version in done:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO public.msstore_migrations (version, name, checksum) "
                        "VALUES ($1, $2, $3)", m.version, m.name, m.checksum,
                    )
            except asyncpg.InsufficientPrivilegeError as e:
                raise _needs_owner(m.filename, e) from e
            except TRANSLATED as e:
                err = pg_error(f"apply {m.filename}", e)
                if isinstance(err, StoreUnavailableError):
                    raise err from e  # an outage is not the file's fault: retry later
                raise MigrationError(f"{m.filename} failed and was rolled back: {e}") from e
            newly.append(m.filename)
        await grant_application_role(conn)
        return newly
    finally:
        if not conn.is_closed():
            with contextlib.suppress(*TRANSLATED):
                await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


async def create_application_role(owner_url: str, app_url: str) -> bool:
    """Create the application role (``msstore_app``, the user of ``app_url``, with its
    password) as the owner, when it is missing; True if it was created. Any other user in
    ``app_url`` is left to you: msstore grants only its own role."""
    parts = urlsplit(app_url)
    if parts.username != PG_APP:
        return False
    with pg_errors(f"create the role {PG_APP}"):
        conn = await asyncpg.connect(owner_url)
        try:
            if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", PG_APP):
                return False
            sql = await conn.fetchval(  # the password as a literal: CREATE ROLE takes no $1
                "SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', $1::text, $2::text)",
                PG_APP, unquote(parts.password or "")) if parts.password else \
                f'CREATE ROLE "{PG_APP}" LOGIN'
            try:
                await conn.execute(sql)
            except asyncpg.DuplicateObjectError:  # another process created it first
                return False
        finally:
            await conn.close()
    return True


async def grant_application_role(conn: Any, role: str = PG_APP) -> bool:
    """Grant ``role`` read/write on msstore's schemas when it exists and lacks any of it (see
    the module docstring); True when grants were made. Names come from :data:`SCHEMAS`."""
    with pg_errors(f"grant {role} its privileges"):
        me = await conn.fetchval("SELECT current_user")
        if me == role or not await conn.fetchval(
                "SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            return False
        if not await conn.fetchval(_GRANTS_MISSING, list(SCHEMAS), role):
            return False
        present = [r[0] for r in await conn.fetch(
            "SELECT quote_ident(nspname) FROM pg_namespace WHERE nspname = ANY($1::text[]) "
            "ORDER BY 1", list(SCHEMAS))]
        who, db = await conn.fetchrow("SELECT quote_ident($1), quote_ident(current_database())",
                                      role)
        async with conn.transaction():
            # temporary tables are DDL too: the database's default lets PUBLIC make them
            await conn.execute(f"REVOKE TEMPORARY ON DATABASE {db} FROM PUBLIC")
            await conn.execute(f"GRANT CONNECT ON DATABASE {db} TO {who}")
            for schema in present:
                await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {who}")
                await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES "
                                   f"IN SCHEMA {schema} TO {who}")
                await conn.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} "
                                   f"TO {who}")
                await conn.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT "
                                   f"SELECT, INSERT, UPDATE, DELETE ON TABLES TO {who}")
                await conn.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT "
                                   f"USAGE, SELECT ON SEQUENCES TO {who}")
            await conn.execute(f"GRANT SELECT ON public.msstore_migrations TO {who}")
    return True


__all__ = [
    "LOCK_KEY",
    "SCHEMAS",
    "Migration",
    "applied",
    "create_application_role",
    "default_directory",
    "grant_application_role",
    "load",
    "migrate",
]
