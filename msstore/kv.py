"""JetStream KV buckets as msstore uses them: one per data category, direct get, own TTL.

A bucket's TTL is the stream's ``max_age``: NATS has no per-key TTL on ``put()`` (only on
``create()``/``purge()`` from server 2.11), so the seed's ``put(key, value, TTL.minutes(30))``
becomes "a bucket whose entries expire 30 minutes after their last write".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, TypeVar

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from .errors import (
    InvalidKeyError,
    InvalidOptionError,
    NoLeaderError,
    StoreTimeoutError,
    StoreUnavailableError,
    UnderReplicatedWarning,
)

log = logging.getLogger("msstore.kv")
T = TypeVar("T")
_BUCKET_RE = re.compile(r"^[a-zA-Z0-9_-]+$")
#: the replica count of every bucket msstore creates, unless a manager says otherwise
REPLICAS_ENV = "MSSTORE_NATS_REPLICAS"

#: The seed's default TTL for session data and agent state.
DEFAULT_TTL_SECONDS = 30 * 60.0


def check_bucket_name(name: str) -> str:
    """Bucket names are one stream token: letters, digits, ``_`` and ``-`` only."""
    if not isinstance(name, str) or not _BUCKET_RE.match(name):
        raise InvalidKeyError(
            f"bucket name {name!r} is invalid: use letters, digits, '_' and '-' only"
        )
    return name


def cluster_size(js: JetStreamContext) -> int:
    """How many servers the connected NATS has: 1, or the larger of the client URLs the
    cluster announced when we connected and the URLs the client was given.

    The announcement alone can be short by a node that had not finished joining yet (seen
    right after a cluster started: an R2 bucket on three nodes); a node that is down while we
    connect is counted only if it was among the URLs given.
    """
    nc = getattr(js, "_nc", None)
    info = getattr(nc, "_server_info", None) or {}
    if not info.get("cluster"):
        return 1
    announced = len(set(info.get("connect_urls") or []))
    given = len({s.uri.netloc for s in getattr(nc, "_server_pool", None) or []
                 if not getattr(s, "discovered", False)})
    return max(1, announced, given)


def check_replicas(replicas: object, what: str = "replicas") -> int | None:
    if replicas is None:
        return None
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 5:
        raise InvalidOptionError(f"{what} must be an int from 1 to 5 (JetStream's limit) or "
                                 f"None for min(3, cluster size), got {replicas!r}")
    return replicas


def wanted_replicas(js: JetStreamContext, replicas: int | None = None) -> int:
    """``replicas`` if given, else ``MSSTORE_NATS_REPLICAS``, else min(3, cluster size)."""
    if replicas is not None:
        return replicas
    env = os.environ.get(REPLICAS_ENV)
    if env:
        try:
            value = int(env)
        except ValueError:
            raise InvalidOptionError(f"{REPLICAS_ENV}={env!r} is not a replica count") from None
        return check_replicas(value, REPLICAS_ENV) or 1
    return min(3, cluster_size(js))


async def ensure_bucket(js: JetStreamContext, name: str, *, ttl: float | None = None,
                        history: int = 1, max_value_size: int | None = None,
                        description: str | None = None,
                        storage: StorageType = StorageType.FILE,
                        replicas: int | None = None) -> KeyValue:
    """Open bucket ``name``, creating it (direct get on, ``history`` revisions) if missing.

    An existing bucket is used as it is, so two processes with the same settings share it —
    but one with fewer replicas than wanted (see :func:`wanted_replicas`) is reported with an
    :class:`~msstore.errors.UnderReplicatedWarning`, not used silently.
    ``history=1`` keeps only the latest revision per key: overwritten revisions leave the
    stream, which is what makes a stream flusher coalesce for free.
    """
    check_bucket_name(name)
    want = wanted_replicas(js, check_replicas(replicas))
    try:
        kv = await js.key_value(name)
    except BucketNotFoundError:
        pass
    else:
        have = (await js.stream_info(f"KV_{name}")).config.num_replicas or 1
        if have < want:
            message = (f"bucket {name!r} has {have} replica(s), {want} wanted on this "
                       f"{cluster_size(js)}-server NATS: msstore uses it as it is, so losing "
                       f"a server can lose or stall it; scale it up (nats stream edit "
                       f"KV_{name} --replicas {want}) or recreate it")
            log.warning(message)
            warnings.warn(message, UnderReplicatedWarning, stacklevel=2)
        return kv
    # Direct gets are answered by any replica, a lagging follower too: a replicated bucket
    # reads through its leader, so a process always reads its own acknowledged writes.
    config = KeyValueConfig(bucket=name, ttl=ttl, history=history, direct=want == 1,
                            max_value_size=max_value_size, description=description,
                            storage=storage, replicas=want)
    return await retry_placement(lambda: js.create_key_value(config=config),
                                 f"create bucket {name!r}")


#: Publish failures that mean "no stream took it": no leader (an election, a lost quorum) or
#: no responders. Nothing was written, so the publish may be sent again.
NOT_STORED: Final = (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError,
                     nats.js.errors.ServiceUnavailableError)
#: How long a write keeps retrying a stream that has no leader, by default (seconds): an
#: election after a node is lost takes a few seconds.
DEFAULT_LEADER_WAIT: Final = 15.0


def not_stored(e: BaseException) -> bool:
    return isinstance(e, NOT_STORED)


async def retry_not_stored(publish: Callable[[], Awaitable[T]], what: str,
                           budget: float, *, also: tuple[type[BaseException], ...] = ()) -> T:
    """``publish()`` again while no stream leader takes it (:data:`NOT_STORED`, and the
    errors in ``also``), with capped backoff, for at most ``budget`` seconds; then
    :class:`NoLeaderError`."""
    deadline = time.monotonic() + budget
    delay = 0.05
    retried = NOT_STORED + also
    while True:
        try:
            return await publish()
        except retried as e:
            if time.monotonic() + delay > deadline:
                raise NoLeaderError(
                    f"NATS had no stream leader to {what} for {budget:g} s (an election, or "
                    f"a quorum lost): nothing was written; retry later ({e!r})") from e
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.5)


#: JetStream's "no suitable peers for placement": a replicated stream asked for before the
#: meta leader has heard from every peer (a cluster just started, a node rejoining)
NO_PLACEMENT: Final = 10005


async def retry_placement(create: Callable[[], Awaitable[T]], what: str,
                          budget: float = DEFAULT_LEADER_WAIT) -> T:
    """``create()`` again while the cluster cannot place its replicas yet, for at most
    ``budget`` seconds; then :class:`StoreUnavailableError` naming the server's reason."""
    deadline = time.monotonic() + budget
    delay = 0.05
    while True:
        try:
            return await create()
        except nats.js.errors.BadRequestError as e:
            if e.err_code != NO_PLACEMENT:
                raise
            if time.monotonic() + delay > deadline:
                raise StoreUnavailableError(
                    f"NATS could not place the replicas to {what} for {budget:g} s "
                    f"({e.description}): is every node of the cluster up?") from e
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.5)


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


__all__ = ["DEFAULT_LEADER_WAIT", "DEFAULT_TTL_SECONDS", "NOT_STORED", "REPLICAS_ENV",
           "check_bucket_name", "check_replicas", "cluster_size", "ensure_bucket", "nats_error",
           "nats_errors", "not_stored", "retry_not_stored", "wanted_replicas"]
