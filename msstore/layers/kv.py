"""DISTRIBUTED_KV: one JetStream KV bucket per data type."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import nats.js.errors
from nats.js.kv import KeyValue

from .._check import optional_seconds, positive_int
from ..codec import MAX_VALUE_BYTES, dumps, loads
from ..errors import InvalidOptionError, InvalidValueError, NotFoundError
from ..keys import decode_key, encode_key
from ..kv import DEFAULT_TTL_SECONDS, check_bucket_name, ensure_bucket, nats_errors
from ..router import Hit
from ._common import check_limit

if TYPE_CHECKING:
    from ..connection import Connection


class KVStore:
    """One JetStream KV bucket: keys through :func:`encode_key`, values through ``dumps``.

    The bucket's max age is the TTL of every entry, counted from its last write (NATS has no
    per-key TTL on ``put``). ``search(prefix)`` is a key listing, not a query: it reads every
    key's header in the bucket, so use it on buckets of thousands of keys, not millions.
    """

    def __init__(self, kv: KeyValue, *, bucket: str, ttl: float | None,
                 max_value_bytes: int = MAX_VALUE_BYTES) -> None:
        if not isinstance(kv, KeyValue):
            raise InvalidOptionError(f"kv must be a nats KeyValue bucket (use KVStore.open), "
                                     f"got {type(kv).__name__}")
        self._kv = kv
        self.bucket = check_bucket_name(bucket)
        self.ttl = optional_seconds("ttl", ttl)
        self.max_value_bytes = positive_int("max_value_bytes", max_value_bytes)

    @classmethod
    async def open(cls, ms: Connection, bucket: str, *,
                   ttl: float | None = DEFAULT_TTL_SECONDS, description: str | None = None,
                   max_value_bytes: int = MAX_VALUE_BYTES) -> KVStore:
        """Open ``bucket``, creating it (direct get, history 1, max age ``ttl``) if missing.

        An existing bucket keeps the settings it was created with; ``ttl`` reports the
        bucket's real max age.
        """
        ttl = optional_seconds("ttl", ttl)
        check_bucket_name(bucket)
        positive_int("max_value_bytes", max_value_bytes)
        if description is not None and not isinstance(description, str):
            raise InvalidOptionError(f"description must be a str or None, got {description!r}")
        with nats_errors(f"opening bucket {bucket!r}"):
            kv = await ensure_bucket(ms.js, bucket, ttl=ttl, description=description)
            status = await kv.status()
        return cls(kv, bucket=bucket, ttl=status.ttl or None, max_value_bytes=max_value_bytes)

    async def put(self, key: str, value: Any) -> int:
        """Write ``value``; return its KV revision (the bucket stream's sequence number)."""
        encoded = encode_key(key)
        data = dumps(value, max_bytes=self.max_value_bytes)
        with nats_errors(f"writing {key!r} to bucket {self.bucket!r}"):
            return await self._kv.put(encoded, data)

    async def store(self, key: str, value: Any) -> str:
        await self.put(key, value)
        return key

    async def retrieve(self, key: str) -> Any:
        encoded = encode_key(key)
        try:
            with nats_errors(f"reading {key!r} from bucket {self.bucket!r}"):
                entry = await self._kv.get(encoded)
        except nats.js.errors.KeyNotFoundError as e:
            ttl = f"{self.ttl:g} s" if self.ttl else "none"
            raise NotFoundError(
                f"key {key!r} is not in bucket {self.bucket!r} (never written, removed, or "
                f"expired: the bucket's TTL is {ttl})"
            ) from e
        return loads(entry.value or b"null")

    async def remove(self, key: str) -> None:
        encoded = encode_key(key)
        with nats_errors(f"removing {key!r} from bucket {self.bucket!r}"):
            await self._kv.delete(encoded)

    async def keys(self) -> list[str]:
        """Every live key in the bucket, decoded, sorted."""
        try:
            with nats_errors(f"listing bucket {self.bucket!r}"):
                encoded = await self._kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        return sorted(decode_key(k) for k in encoded)

    async def search(self, query: Any, *, limit: int = 10) -> list[Hit]:
        """Entries whose decoded key starts with ``query``, in key order."""
        if not isinstance(query, str):
            raise InvalidValueError(f"KV search takes a key prefix (str), got "
                                    f"{type(query).__name__}")
        limit = check_limit(limit)
        matches = [k for k in await self.keys() if k.startswith(query)][:limit]

        async def one(key: str) -> Hit | None:
            try:
                return Hit(key, await self.retrieve(key))
            except NotFoundError:  # removed or expired since the listing
                return None

        hits = await asyncio.gather(*(one(k) for k in matches))
        return [h for h in hits if h is not None]


__all__ = ["KVStore"]
