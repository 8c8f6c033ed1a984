"""The embedded servers' credentials: generated once per state folder, kept in a 0600 file.

::

    <state folder>/credentials.json   mode 0600, owned by whoever ran ``msstore up`` first
      postgres.owner / owner_password   the role that owns the schema and runs migrations
      postgres.app   / app_password     the role ``connect()`` uses: read and write, no DDL
      nats.user      / password         the only user the embedded nats-server accepts

The servers never see this file: PostgreSQL keeps SCRAM verifiers of the passwords, and
nats-server reads its own generated config (also 0600). ``services.json`` (world-readable)
records URLs *without* passwords; :func:`with_password` adds them when ``connect()`` or
``msstore env`` needs them, and :func:`redact` hides them in messages and ``msstore status``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit, urlunsplit

from .errors import ServiceError

FILE: Final = "credentials.json"
PG_OWNER: Final = "postgres"
PG_APP: Final = "msstore_app"
NATS_USER: Final = "msstore"


def _new() -> dict[str, dict[str, str]]:
    return {"postgres": {"owner": PG_OWNER, "owner_password": secrets.token_urlsafe(32),
                         "app": PG_APP, "app_password": secrets.token_urlsafe(32)},
            "nats": {"user": NATS_USER, "password": secrets.token_urlsafe(32)}}


def path(home: Path) -> Path:
    return home / FILE


def load(home: Path) -> dict[str, dict[str, str]] | None:
    """The credentials of ``home`` (None before the first ``up``)."""
    try:
        data: Any = json.loads(path(home).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ServiceError(
            f"cannot read {path(home)} ({e}); it must be readable by the user running msstore "
            "(delete it with `msstore down --purge` to start over)") from e
    return data if isinstance(data, dict) else None


def ensure(home: Path) -> tuple[dict[str, dict[str, str]], bool]:
    """The credentials of ``home``, generated on first use; True when made by this call.

    Callers hold the state folder's lock.
    """
    found = load(home)
    if found is not None:
        if path(home).stat().st_mode & 0o077:
            os.chmod(path(home), 0o600)  # our own file, copied with looser bits: close it
        return found, False
    creds = _new()
    save(home, creds)
    return creds, True


def renewed() -> dict[str, dict[str, str]]:
    """New passwords for the same users (``msstore up --rotate-credentials``)."""
    return _new()


def save(home: Path, creds: dict[str, dict[str, str]]) -> None:
    """Write the file with ``O_EXCL`` and mode 0600 (never readable by another user, even for a
    moment), then move it into place."""
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f".{FILE}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(creds, fh, indent=2)
    tmp.replace(path(home))


def with_password(url: str, user: str, password: str) -> str:
    """``url`` (one or comma-separated) with ``user:password@`` in each netloc."""
    out = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        host = parts.netloc.rsplit("@", 1)[-1]
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
        out.append(urlunsplit(parts._replace(netloc=netloc)))
    return ",".join(out)


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages, logs and status)."""
    out = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        if parts.password is None:
            out.append(one.strip())
            continue
        user, host = parts.netloc.rsplit("@", 1)
        out.append(urlunsplit(parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}")))
    return ",".join(out)


__all__ = ["NATS_USER", "PG_APP", "PG_OWNER", "ensure", "load", "path", "redact", "renewed",
           "save", "with_password"]
