"""JetStream KV buckets as msstore uses them: one per data category, direct get, own TTL.

A bucket's TTL is the stream's ``max_age``: NATS has no per-key TTL on ``put()`` (only on
``create()``/``purge()`` from server 2.11), so the seed's ``put(key, value, TTL.minutes(30))``
becomes "a bucket whose entries expire 30 minutes after their last write".
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from .errors import InvalidKeyError, StoreTimeoutError, StoreUnavailableError

_BUCKET_RE = re.compile(r"^[a-zA-Z0-9_-]+$")

#: The seed's default TTL for session data and agent state.
DEFAULT_TTL_SECONDS = 30 * 60.0


def check_bucket_name(name: str) -> str:
    """Bucket names are one stream token: letters, digits, ``_`` and ``-`` only."""
    if not isinstance(name, str) or not _BUCKET_RE.match(name):
        raise InvalidKeyError(
            f"bucket name {name!r} is invalid: use letters, digits, '_' and '-' only"
        )
    return name


async def ensure_bucket(js: JetStreamContext, name: str, *, ttl: float | None = None,
                        history: int = 1, max_value_size: int | None = None,
                        description: str | None = None,
                        storage: StorageType = StorageType.FILE) -> KeyValue:
    """Open bucket ``name``, creating it (direct get on, ``history`` revisions) if missing.

    An existing bucket is used as it is, so two processes with the same settings share it.
    ``history=1`` keeps only the latest revision per key: overwritten revisions leave the
    stream, which is what makes a stream flusher coalesce for free.
    """
    check_bucket_name(name)
    try:
        return await js.key_value(name)
    except BucketNotFoundError:
        pass
    config = KeyValueConfig(bucket=name, ttl=ttl, history=history, direct=True,
                            max_value_size=max_value_size, description=description,
                            storage=storage)
    return await js.create_key_value(config=config)


def nats_error(what: str, e: BaseException) -> StoreTimeoutError | StoreUnavailableError:
    """The msstore error for a NATS failure to do ``what`` (for hot paths that inline it)."""
    if isinstance(e, nats.errors.TimeoutError | TimeoutError):
        return StoreTimeoutError(f"NATS did not answer to {what} in time: {e!r}")
    return StoreUnavailableError(f"NATS failed to {what}: {e!r}")


@contextlib.contextmanager
def nats_errors(what: str) -> Iterator[None]:
    """Translate nats-py transport errors into msstore's, keeping the cause.

    KV's own answers (key not found, wrong last sequence, no keys: ``KeyValueError``) pass
    through untouched: they are results for the caller to interpret, not outages.
    """
    try:
        yield
    except nats.js.errors.KeyValueError:
        raise
    except (nats.errors.Error, TimeoutError) as e:
        raise nats_error(what, e) from e


__all__ = ["DEFAULT_TTL_SECONDS", "check_bucket_name", "ensure_bucket", "nats_error",
           "nats_errors"]
